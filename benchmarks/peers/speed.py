#!/usr/bin/env python
"""Inference seconds per 1000x1000 tile of nuclei-d2 models and of the peers, on the same tiles and threads, in one run.

    python benchmarks/peers/speed.py --model maskrcnn_plus-monuseg --model two_stage_unet-monuseg \\
        --peer stardist=runs/peers/stardist --tiles 4 --threads 1 --output runs/peers/speed

nuclei-d2 models (``--model NAME``: a model zoo entry; ``--config CONFIG WEIGHTS``: a config and its trained
weights) run here, in nuclei-d2's venv, through :class:`nuclei_d2.inference.predictor.Predictor` (what
``tools/predict.py`` uses: the dataset mapper, the model, tiling and stitching). Each peer (``--peer NAME=RUN``: a
finished run of ``train_<NAME>.py``) runs in its own venv's python as ``train_<NAME>.py --predict-from RUN``, which
times each tile inside the peer process. Everywhere the clock covers one prediction of an RGB array in memory
(the method's normalisation and post-processing included; model loading, reading and writing excluded), after
``--warmup`` untimed predictions of the first tile, with ``--threads`` threads; the process's CPU seconds over the
same call are recorded too (on a loaded machine the wall clock also counts the time other processes had the cores).
The tiles are the first ``--tiles`` test tiles of ``--split``. Prints the table method | s per tile (mean, min) | CPU
s per tile | ratio to the first nuclei-d2 model given (mean over mean, wall clock and CPU); writes
``OUTPUT/speed.csv``, ``OUTPUT/speed.json`` and each method's label maps under ``OUTPUT/<method>/labels``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(REPO))  # this clone's nuclei_d2, whatever the venv has installed
import _common  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "monuseg2018"
CSV_FIELDS = ("method", "kind", "source", "tiles", "threads", "s_per_tile_mean", "s_per_tile_min",
              "cpu_s_per_tile_mean", "ratio", "cpu_ratio")


def default_venv(peer: str, environ: dict[str, str] | None = None) -> Path:
    """The venv ``setup_<peer>.sh`` makes (the path logic of ``_venv.sh``): ``${NUCLEI_D2_PEERS:-~/.cache/nuclei-d2/
    peers}/<peer>-<first 10 hex of sha256(setup_<peer>.sh + _venv.sh)>``."""
    environ = os.environ if environ is None else environ
    digest = hashlib.sha256((HERE / f"setup_{peer}.sh").read_bytes() + (HERE / "_venv.sh").read_bytes())
    root = Path(environ.get("NUCLEI_D2_PEERS") or Path.home() / ".cache" / "nuclei-d2" / "peers")
    return root / f"{peer}-{digest.hexdigest()[:10]}"


class _Ordered(argparse.Action):
    """Append ``(kind, values)`` to ``namespace.methods``, so the table keeps the command line's order."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001, ANN204
        methods = list(getattr(namespace, "methods", None) or [])
        methods.append((self.const, values))
        namespace.methods = methods


def _pair(text: str, flag: str, p: argparse.ArgumentParser) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        p.error(f"{flag} {text!r}: expected NAME=PATH")
    if name not in _common.PEERS:
        p.error(f"{flag} {text!r}: unknown peer {name!r} (known: {', '.join(_common.PEERS)})")
    return name, value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, checked: at least one nuclei-d2 model, peers as NAME=RUN, unique method names, existing
    files, usable peer runs and venvs, enough test tiles. Errors exit with argparse's usage line and one message.
    Imports nothing of nuclei-d2 (zoo names are checked by :func:`check_zoo_names`, once the thread limits are set)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action=_Ordered, const="zoo", dest="methods", metavar="NAME",
                   help="a nuclei-d2 model zoo entry (repeat for more)")
    p.add_argument("--config", action=_Ordered, const="config", dest="methods", nargs=2,
                   metavar=("CONFIG", "WEIGHTS"), help="a nuclei-d2 config file and its trained weights (repeatable)")
    p.add_argument("--peer", action="append", default=[], metavar="NAME=RUN",
                   help=f"a peer ({', '.join(_common.PEERS)}) and the folder of its finished training run")
    p.add_argument("--peer-venv", action="append", default=[], metavar="NAME=VENV",
                   help="the peer's venv (default: the one its setup script makes)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset folder with splits.json")
    p.add_argument("--split", default=_common.DEFAULT_SPLIT, help="its test tiles are timed")
    p.add_argument("--tiles", type=int, default=4, help="the first N test tiles")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of every method")
    p.add_argument("--warmup", type=int, default=1, help="untimed predictions of the first tile per method")
    p.add_argument("--output", type=Path, required=True, help="folder for speed.csv, speed.json, <method>/labels")
    args = p.parse_args(argv)
    args.methods = list(args.methods or [])
    if not args.methods:
        p.error("give at least one nuclei-d2 model (--model NAME or --config CONFIG WEIGHTS): the ratios are to the "
                "first")
    for flag, value in (("--tiles", args.tiles), ("--threads", args.threads)):
        if value < 1:
            p.error(f"{flag} must be >= 1, got {value}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    peers = [_pair(t, "--peer", p) for t in args.peer]
    venvs = dict(_pair(t, "--peer-venv", p) for t in args.peer_venv)
    extra = sorted(set(venvs) - {n for n, _ in peers})
    if extra:
        p.error(f"--peer-venv {extra[0]}=...: no --peer {extra[0]}=RUN to time")
    for kind, value in args.methods:
        if kind == "config":
            for f in value:
                if not Path(f).is_file():
                    p.error(f"--config {value[0]} {value[1]}: {f}: no such file")
    args.ours = [(value if kind == "zoo" else Path(value[0]).stem, kind, value) for kind, value in args.methods]
    args.peers = []
    for name, run in peers:
        try:
            _common.read_run(Path(run), name)
        except _common.RunError as e:
            p.error(f"--peer {name}={run}: {e}")
        venv = Path(venvs[name]) if name in venvs else default_venv(name)
        if not (venv / "bin" / "python").is_file():
            p.error(f"--peer {name}: no venv at {venv} (bash benchmarks/peers/setup_{name}.sh builds it; or give "
                    f"--peer-venv {name}=VENV)")
        args.peers.append((name, Path(run), venv))
    names = [n for n, _, _ in args.ours] + [n for n, _, _ in args.peers]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        p.error(f"method {dup[0]!r} given twice (each is timed once; one label per method)")
    try:
        _, test = _common.split_ids(args.data, args.split, None, args.tiles)
    except _common.RunError as e:
        p.error(str(e))
    if len(test) < args.tiles:
        p.error(f"--tiles {args.tiles}: split {args.split!r} has only {len(test)} test tiles")
    args.tile_ids = test
    return args


def check_zoo_names(args: argparse.Namespace) -> None:
    """Exit with a one-line error when a ``--model`` is not an entry of the model zoo in use."""
    from nuclei_d2.model_zoo import list_models

    known = list_models()
    for label, kind, _ in args.ours:
        if kind == "zoo" and label not in known:
            raise SystemExit(f"error: --model {label}: not a model zoo entry (known: {', '.join(known) or 'none'})")


def summarize(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of the table from ``[{"method", "kind", "source", "threads", "seconds": [per tile], "cpu_seconds":
    [per tile] or None}]``: mean and min seconds per tile, mean CPU seconds (NaN when not measured), and the ratios
    of each mean to the first nuclei-d2 model's (kind ``zoo`` or ``config``)."""
    rows = []
    for r in results:
        seconds = [float(s) for s in r["seconds"]]
        if not seconds:
            raise ValueError(f"{r['method']}: no timed tile")
        cpu = r.get("cpu_seconds")
        if cpu is not None and len(cpu) != len(seconds):
            raise ValueError(f"{r['method']}: {len(cpu)} CPU times for {len(seconds)} tiles")
        rows.append({"method": r["method"], "kind": r["kind"], "source": r["source"], "tiles": len(seconds),
                     "threads": r["threads"], "s_per_tile_mean": sum(seconds) / len(seconds),
                     "s_per_tile_min": min(seconds),
                     "cpu_s_per_tile_mean": sum(map(float, cpu)) / len(cpu) if cpu else math.nan})
    base = next((r for r in rows if r["kind"] in ("zoo", "config")), None)
    if base is None:
        raise ValueError("no nuclei-d2 model among the results: nothing to give the ratios to")
    for r in rows:
        r["ratio"] = r["s_per_tile_mean"] / base["s_per_tile_mean"]
        r["cpu_ratio"] = (r["cpu_s_per_tile_mean"] / base["cpu_s_per_tile_mean"]
                          if base["cpu_s_per_tile_mean"] > 0 else math.nan)
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a Markdown table (ratios: mean seconds per tile over the first nuclei-d2 model's)."""
    base = next(r["method"] for r in rows if r["kind"] in ("zoo", "config"))
    lines = [f"| method | kind | tiles | threads | s per tile (mean) | s per tile (min) | CPU s per tile (mean) | "
             f"ratio to {base} | CPU ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['kind']} | {r['tiles']} | {r['threads']} | {r['s_per_tile_mean']:.2f} | "
                     f"{r['s_per_tile_min']:.2f} | {r['cpu_s_per_tile_mean']:.2f} | {r['ratio']:.2f} | "
                     f"{r['cpu_ratio']:.2f} |")
    return "\n".join(lines)


def write_outputs(output: Path, rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> tuple[Path, Path]:
    """``output/speed.csv`` (one row per method) and ``output/speed.json`` (``meta`` and the rows), each written to a
    temporary file and renamed."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r[k] for k in CSV_FIELDS})
    path_csv = _common._atomic(Path(output) / "speed.csv", lambda f: f.write(buf.getvalue().encode()))
    path_json = _common.write_json(Path(output) / "speed.json", {**meta, "rows": list(rows)})
    return path_csv, path_json


def read_predict_json(path: Path, tiles: Sequence[str]) -> tuple[list[float], list[float] | None]:
    """Seconds and CPU seconds (None if not recorded) per tile a peer's ``--predict-from`` wrote in
    ``predict.json``, in the order of ``tiles`` (every one must be there)."""
    try:
        record = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: missing (the peer's --predict-from did not finish)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    by_tile = record.get("seconds_by_tile") if isinstance(record, dict) else None
    if not isinstance(by_tile, dict):
        raise ValueError(f"{path}: no seconds_by_tile")
    missing = [t for t in tiles if t not in by_tile]
    if missing:
        raise ValueError(f"{path}: no time for tile {missing[0]}")
    cpu = record.get("cpu_seconds_by_tile")
    cpu = [float(cpu[t]) for t in tiles] if isinstance(cpu, dict) and all(t in cpu for t in tiles) else None
    return [float(by_tile[t]) for t in tiles], cpu


def time_ours(label: str, kind: str, value: Any, images: Sequence[tuple[str, Any]], args: argparse.Namespace
              ) -> tuple[list[float], list[float]]:
    """Seconds and CPU seconds per tile of a nuclei-d2 model through the Predictor (built first, not timed); label
    maps go to ``OUTPUT/<label>/labels``."""
    import torch

    torch.set_num_threads(args.threads)
    if kind == "zoo":
        from nuclei_d2.model_zoo import get_predictor

        predictor = get_predictor(value, device="cpu", progress=False)
    else:
        from nuclei_d2.engine import setup_cfg
        from nuclei_d2.inference.predictor import Predictor

        cfg = setup_cfg(value[0], ["MODEL.WEIGHTS", value[1], "MODEL.DEVICE", "cpu"], eval_only=True)
        predictor = Predictor(cfg, progress=False)
    for _ in range(args.warmup):
        predictor.predict(images[0][1])
    seconds, cpu = [], []
    for tile, rgb in images:
        t0, c0 = time.perf_counter(), time.process_time()
        nuclei = predictor.predict(rgb)
        seconds.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        _common.write_labels(args.output / label, tile, nuclei.to_label_map())
        print(f"{label}: {tile}: {len(nuclei)} nuclei in {seconds[-1]:.2f} s ({cpu[-1]:.2f} s CPU)", flush=True)
    return seconds, cpu


def peer_command(name: str, run: Path, venv: Path, args: argparse.Namespace) -> list[str]:
    """``VENV/bin/python train_<name>.py --predict-from RUN`` on the timed tile files, threads and warm-up."""
    return [str(venv / "bin" / "python"), str(HERE / f"train_{name}.py"), "--predict-from", str(run),
            "--input", *[str(_common.tile_path(args.data, t)) for t in args.tile_ids], "--threads", str(args.threads),
            "--warmup", str(args.warmup), "--output", str(args.output / name)]


def time_peer(name: str, run: Path, venv: Path, args: argparse.Namespace) -> tuple[list[float], list[float] | None]:
    """Seconds and CPU seconds per tile of a peer: ``train_<name>.py --predict-from RUN`` in its venv, on the same
    tile files."""
    out = args.output / name
    cmd = peer_command(name, run, venv, args)
    print(f"{name}: {' '.join(cmd)}", flush=True)
    done = subprocess.run(cmd, cwd=REPO)
    if done.returncode:
        raise SystemExit(f"error: {name}: --predict-from failed (exit {done.returncode}); its output is above")
    return read_predict_json(out / "predict.json", args.tile_ids)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for var in _common.THREAD_VARS:  # before torch is imported
        os.environ[var] = str(args.threads)
    check_zoo_names(args)
    args.output.mkdir(parents=True, exist_ok=True)
    images = [(t, _common.read_image(args.data, t)) for t in args.tile_ids]
    results = []
    for label, kind, value in args.ours:
        seconds, cpu = time_ours(label, kind, value, images, args)
        results.append({"method": label, "kind": kind, "source": value if kind == "zoo" else " ".join(value),
                        "threads": args.threads, "seconds": seconds, "cpu_seconds": cpu})
    for name, run, venv in args.peers:
        seconds, cpu = time_peer(name, run, venv, args)
        results.append({"method": name, "kind": "peer", "source": str(run), "threads": args.threads,
                        "seconds": seconds, "cpu_seconds": cpu})
    rows = summarize(results)
    meta = {"argv": sys.argv, "tiles": args.tile_ids, "split": args.split, "data": str(args.data),
            "threads": args.threads, "warmup": args.warmup, "machine": platform.machine(), "cpus": os.cpu_count(),
            "seconds_by_method": {r["method"]: r["seconds"] for r in results},
            "cpu_seconds_by_method": {r["method"]: r["cpu_seconds"] for r in results}}
    print(format_table(rows))
    for path in write_outputs(args.output, rows, meta):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
