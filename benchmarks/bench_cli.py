#!/usr/bin/env python
"""Start-up cost of the tools: wall time and peak memory of ``tools/<name>.py --help``.

Run by hand (not a test), from the repository root:

    python benchmarks/bench_cli.py [--repeats 5] [--tools train_net predict]

Each command runs ``--repeats`` times as a fresh process; the table shows the median wall time and the peak resident
memory (the child's ``ru_maxrss``), each also as a ratio to ``python -c pass`` measured in the same run (machines are
noisy; the ratio is what to compare between machines), and as a share of ``python -c "import nuclei_d2"`` (torch +
Detectron2: what ``--help`` cost before the parsers moved into the tools). ``tests/test_cli.py`` checks the property
itself: no tool imports torch for ``--help`` or an argument error.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tabulate import tabulate

REPO = Path(__file__).resolve().parents[1]
TOOLS = sorted(p.stem for p in (REPO / "tools").glob("*.py"))


def measure(cmd: list[str], repeats: int) -> tuple[float, float]:
    """Median wall seconds and the largest peak RSS (MB) of ``repeats`` runs of ``cmd``."""
    times, peaks = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (ru_maxrss in KB on Linux)
        times.append(time.perf_counter() - start)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} exited with {proc.returncode}")
        peaks.append(usage.ru_maxrss / 1024)
    return statistics.median(times), max(peaks)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="runs per command (median time, max peak memory)")
    p.add_argument("--tools", nargs="+", default=TOOLS, choices=TOOLS)
    args = p.parse_args()
    py = sys.executable
    commands = {
        "python -c pass": [py, "-c", "pass"],
        "python -c 'import nuclei_d2'": [py, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); import nuclei_d2"],
        **{f"tools/{t}.py --help": [py, str(REPO / "tools" / f"{t}.py"), "--help"] for t in args.tools},
    }
    results = {name: measure(cmd, args.repeats) for name, cmd in commands.items()}
    base_t, base_m = results["python -c pass"]
    pkg_t, pkg_m = results["python -c 'import nuclei_d2'"]
    rows = [[name, f"{t:.3f}", f"{t / base_t:.1f}x", f"{t / pkg_t:.0%}", f"{m:.0f}", f"{m / base_m:.1f}x",
             f"{m / pkg_m:.0%}"] for name, (t, m) in results.items()]
    print(f"{args.repeats} runs each, {py} ({sys.version.split()[0]}), {os.cpu_count()} CPUs")
    print(tabulate(rows, headers=["command", "wall s (median)", "vs pass", "vs import nuclei_d2", "peak RSS MB",
                                  "vs pass", "vs import nuclei_d2"], stralign="right", disable_numparse=True))


if __name__ == "__main__":
    main()
