"""BRP-Net by hand: CPU inference time per 1000x1000 tile (stage 1 / proposals / stage 2), and the proposal-dilation
robustness curve (the paper's Fig. 5a) of a trained model on a registered dataset. Never run by the test suite.

Timing (random weights of a config; the cost does not depend on the weights, except the number of proposals, which
is set with --oracle-nuclei: proposals are made from a synthetic probability map holding that many nuclei):

    python benchmarks/bench_brpnet.py time --config-file configs/brpnet.yaml [--size 1000] [--repeat 2] [opts...]

Robustness curve (AJI / F1 of TAFE + post-processing and of the full BRP-Net per dilation radius; TAFE runs once per
image, the radius only changes the proposals):

    NUCLEI_D2_DATASETS=/root/nd2-datasets python benchmarks/bench_brpnet.py radius --config-file configs/brpnet.yaml \
        --weights output/brpnet/stage2/model_final.pth --dataset kumar_test --radii 0,1,2,3,4 [opts...]

Both print a table; ``time`` also reports the ratio of each part to stage 1, measured in the same run. ``radius``
also gives the missed (MDR), under- (USR) and over-segmented (OSR) shares of the ground-truth nuclei before and after
the refinement: where a trained model loses its nuclei (docs/time_to_accuracy.md, "Against the goal").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _model(config: str, opts: list[str], weights: str = ""):
    from nuclei_d2.checkpoint import NucleiCheckpointer
    from nuclei_d2.engine import setup_cfg
    from nuclei_d2.modeling import build_nuclei_model

    cfg = setup_cfg(config, ["MODEL.DEVICE", "cpu", *opts, *(["MODEL.WEIGHTS", weights] if weights else [])])
    model = build_nuclei_model(cfg).eval()
    if weights:
        NucleiCheckpointer.from_config(model, cfg, config_file=config).load(weights)
    return cfg, model


def _synthetic_maps(size: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Semantic/boundary maps of ``n`` random disks (radius 4-9 px) on a ``size`` x ``size`` tile."""
    from nuclei_d2.data.targets import boundary_map

    rng = np.random.default_rng(seed)
    label = np.zeros((size, size), np.int32)
    yy, xx = np.mgrid[:size, :size]
    for i in range(1, n + 1):
        cy, cx, r = rng.integers(10, size - 10), rng.integers(10, size - 10), rng.integers(4, 10)
        y0, y1, x0, x1 = cy - r, cy + r + 1, cx - r, cx + r + 1
        disk = (yy[y0:y1, x0:x1] - cy) ** 2 + (xx[y0:y1, x0:x1] - cx) ** 2 <= r * r
        label[y0:y1, x0:x1][disk] = i
    return (label > 0).astype(np.float32), boundary_map(label, 2).astype(np.float32)


def cmd_time(args: argparse.Namespace) -> None:
    from nuclei_d2.modeling.brpnet import extract_proposals

    torch.set_num_threads(args.threads)
    cfg, model = _model(args.config_file, args.opts)
    image = torch.rand(3, args.size, args.size) * 255
    sem, bnd = _synthetic_maps(args.size, args.oracle_nuclei)
    rows = []
    for r in range(args.repeat):
        t0 = time.perf_counter()
        model.predict_probs(image)
        t1 = time.perf_counter()
        label, _ = extract_proposals(sem, bnd, **model.proposal)
        t2 = time.perf_counter()
        refined, _ = model.refine(image, sem, bnd, label)
        t3 = time.perf_counter()
        rows.append((t1 - t0, t2 - t1, t3 - t2))
        print(f"run {r}: {int(label.max())} proposals -> {int(refined.max())} nuclei", file=sys.stderr)
    s1, pr, s2 = np.median(np.array(rows), axis=0)
    print(f"BRP-Net CPU inference, {args.size}x{args.size} tile, {args.threads} thread(s), "
          f"{args.config_file} {' '.join(args.opts)}")
    print(f"{'part':<12}{'seconds':>10}{'x stage 1':>12}")
    for name, v in (("stage 1", s1), ("proposals", pr), ("stage 2", s2), ("total", s1 + pr + s2)):
        print(f"{name:<12}{v:>10.3f}{v / s1:>12.3f}")


def cmd_radius(args: argparse.Namespace) -> None:
    from detectron2.data import DatasetCatalog
    from tqdm import tqdm

    from nuclei_d2.data.datasets import register_datasets_from_config
    from nuclei_d2.data.mapper import NucleiDatasetMapper
    from nuclei_d2.evaluation.metrics import contingency_table, metric_counts, metrics_from_counts
    from nuclei_d2.modeling.brpnet import extract_proposals
    from nuclei_d2.structures import annotations_to_label_map

    torch.set_num_threads(args.threads)
    radii = [float(r) for r in args.radii.split(",") if r.strip()]
    cfg, model = _model(args.config_file, args.opts, args.weights)
    register_datasets_from_config(cfg)
    dicts = DatasetCatalog.get(args.dataset)[: args.max_images or None]
    mapper = NucleiDatasetMapper(cfg, is_train=False)
    sums: dict[tuple[str, float], dict[str, float]] = {}
    for d in tqdm(dicts, desc="images"):
        inp = mapper(d)
        gt = annotations_to_label_map(d["annotations"], d["height"], d["width"])
        probs = model.predict_probs(inp["image"]).numpy()
        for radius in radii:
            kw = dict(model.proposal, dilation=float(radius))
            label, _ = extract_proposals(probs[0], probs[1], **kw)
            preds = {"TAFE+post": label}
            if not args.proposals_only:
                preds["BRP-Net"] = model.refine(inp["image"], probs[0], probs[1], label)[0] if label.any() else label
            for name, pred in preds.items():
                c = metric_counts(contingency_table(gt, pred), 0.5, hausdorff=False)
                acc = sums.setdefault((name, float(radius)), {})
                for k, v in c.items():
                    acc[k] = acc.get(k, 0.0) + float(v)
    print(f"{args.dataset} ({len(dicts)} images), weights {args.weights}; pooled AJI / F1 (IoU > 0.5) / PQ and the "
          "missed, under- and over-segmented shares of the ground-truth nuclei")
    print(f"{'method':<12}{'radius':>8}{'AJI':>8}{'F1':>8}{'PQ':>8}{'MDR':>8}{'USR':>8}{'OSR':>8}")
    for (name, radius), counts in sorted(sums.items()):
        m = metrics_from_counts(counts)
        print(f"{name:<12}{radius:>8g}" + "".join(f"{m[k]:>8.4f}" for k in ("AJI", "F1", "PQ", "MDR", "USR", "OSR")))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("time", help="CPU inference time per tile, split into stage 1 / proposals / stage 2")
    t.add_argument("--config-file", default="configs/brpnet.yaml")
    t.add_argument("--size", type=int, default=1000)
    t.add_argument("--repeat", type=int, default=2)
    t.add_argument("--oracle-nuclei", type=int, default=600, help="nuclei in the synthetic proposal maps")
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    r = sub.add_parser("radius", help="AJI/F1 against the proposal dilation radius (Fig. 5a)")
    r.add_argument("--config-file", required=True)
    r.add_argument("--weights", required=True)
    r.add_argument("--dataset", default="kumar_test")
    r.add_argument("--radii", default="0,1,2,3,4", help="comma-separated dilation radii in px")
    r.add_argument("--max-images", type=int, default=0)
    r.add_argument("--proposals-only", action="store_true")
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = p.parse_args()
    {"time": cmd_time, "radius": cmd_radius}[args.cmd](args)


if __name__ == "__main__":
    main()
