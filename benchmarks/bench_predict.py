#!/usr/bin/env python
"""Peak memory and tiles/s of tiled prediction (tools/predict.py's pipeline) on 2k, 8k and 16k synthetic slides.

Each synthetic slide is a tiled TIFF on disk (a 1024 px synthetic H&E tile repeated), so reading it costs no memory.
Each (model, size) runs in a fresh subprocess that reports its own peak RSS (``ru_maxrss``), its RSS once the model
is built (the baseline), tiles/s and nuclei; the whole pipeline runs: region reading, the model on tile batches,
stitching, measurements, GeoJSON + CSV written to disk. Memory should stay nearly flat as the slide grows.

Models: ``oracle`` (a threshold + connected components "model": isolates the pipeline's own cost), and any tiny
config (random weights: their speed is real, their nuclei are not).

    python benchmarks/bench_predict.py                                     # default plan (~25 min on 2 shared cores)
    python benchmarks/bench_predict.py --sizes 2048 --models oracle maskrcnn_baseline-tiny.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this clone's nuclei_d2, whatever the venv has installed
DEFAULT_PLAN = [("oracle", 2048), ("oracle", 8192), ("oracle", 16384),
                ("two_stage_unet-tiny.yaml", 2048), ("two_stage_unet-tiny.yaml", 4096),
                ("maskrcnn_baseline-tiny.yaml", 2048)]


def make_slide(path: Path, size: int, density: float = 0.3) -> Path:
    """A ``size x size`` tiled TIFF made of one 1024 px synthetic tile repeated (written tile by tile)."""
    import tifffile

    from nuclei_d2.data.synthetic import make_synthetic_tile

    if path.is_file():
        return path
    base, _ = make_synthetic_tile(1024, 0, density=density)
    t = 256

    def tiles():
        for y in range(0, size, t):
            for x in range(0, size, t):
                yield base[y % 1024:y % 1024 + t, x % 1024:x % 1024 + t]

    tifffile.imwrite(path, tiles(), shape=(size, size, 3), dtype=np.uint8, tile=(t, t), photometric="rgb",
                     bigtiff=size * size * 3 > 2**31, compression="zlib")
    return path


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(model: str, slide: str, tile: int, batch: int, out: str) -> dict:
    import nuclei_d2  # noqa: F401
    from nuclei_d2.inference import Predictor, RunOptions, predict_file

    if model == "oracle":
        from scipy import ndimage

        from nuclei_d2.stain import hematoxylin_channel
        from nuclei_d2.structures import CropMasks

        def fn(tiles):
            res = []
            for t in tiles:
                lab, n = ndimage.label(hematoxylin_channel(t) > 0.3)
                res.append(CropMasks.from_label_map(lab, np.full(n, 0.9) if n else None))
            return res

        pred = Predictor(tile_fn=fn, tile_size=tile, overlap=64, batch_size=batch, progress=False)
    else:
        from nuclei_d2.engine import setup_cfg

        opts = ["MODEL.DEVICE", "cpu"]
        if "unet" in model:
            opts += ["MODEL.TILING.PATCH_SIZE", "256", "MODEL.TILING.STRIDE", "192"]
        cfg = setup_cfg(str(REPO / "configs" / model), opts)
        pred = Predictor(cfg, tile_size=tile, overlap=64, batch_size=batch, progress=False)
    base = _rss_mb()
    t0 = time.perf_counter()
    res = predict_file(pred, slide, out, RunOptions(outputs=["geojson", "csv"]))
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"tiles": res.tiles, "nuclei": res.nuclei, "seconds": dt, "tiles_per_s": res.tiles / dt,
            "rss_after_model_mb": base, "peak_rss_mb": peak}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="*", default=None)
    p.add_argument("--models", nargs="*", default=None)
    p.add_argument("--tile-size", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "nuclei_d2_bench_predict"))
    p.add_argument("--child", nargs=2, metavar=("MODEL", "SLIDE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if args.child:
        print("RESULT " + json.dumps(child(args.child[0], args.child[1], args.tile_size, args.batch_size,
                                           str(work / "out"))))
        return 0
    if args.sizes or args.models:
        plan = [(m, s) for m in (args.models or ["oracle"]) for s in (args.sizes or [2048, 8192, 16384])]
    else:
        plan = DEFAULT_PLAN
    rows = []
    for model, size in plan:
        slide = make_slide(work / f"synthetic_{size}.tif", size)
        cmd = [sys.executable, __file__, "--child", model, str(slide), "--tile-size", str(args.tile_size),
               "--batch-size", str(args.batch_size), "--workdir", str(work)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        if r.returncode or not line:
            print(f"{model} {size}: failed\n{r.stderr[-2000:]}", file=sys.stderr)
            continue
        res = json.loads(line[0][7:])
        rows.append((model, size, res))
        print(f"{model:28s} {size:>6d}px  {res['tiles']:4d} tiles  {res['tiles_per_s']:6.2f} tiles/s  "
              f"{res['nuclei']:7d} nuclei  RSS after model {res['rss_after_model_mb']:6.0f} MB  "
              f"peak {res['peak_rss_mb']:6.0f} MB", flush=True)
    print("\n| model | image | tiles | tiles/s | nuclei | RSS after model (MB) | peak RSS (MB) | peak vs smallest |")
    print("|---|---|---|---|---|---|---|---|")
    first: dict[str, float] = {}
    for model, size, res in rows:
        first.setdefault(model, res["peak_rss_mb"])
        print(f"| {model} | {size} x {size} | {res['tiles']} | {res['tiles_per_s']:.2f} | {res['nuclei']} | "
              f"{res['rss_after_model_mb']:.0f} | {res['peak_rss_mb']:.0f} | "
              f"{res['peak_rss_mb'] / first[model]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
