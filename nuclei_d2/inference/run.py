"""The batch runner behind ``tools/predict.py``: inputs -> outputs per file, sharded, restartable, fault-tolerant.

* **Inputs**: files, folders (searched recursively for image/slide suffixes) and glob patterns, sorted and
  de-duplicated (:func:`collect_inputs`).
* **Sharding**: process ``rank`` of ``world`` takes inputs ``rank, rank + world, ...`` and writes its own outputs
  (Detectron2's ``launch`` for ``--num-gpus`` / several machines, or ``--shard K/N`` by hand).
* **Restart**: every output is written atomically; a file's ``<stem>.done.json`` marker is written last. A rerun
  skips files whose marker exists and whose outputs are all present, so a killed run resumes where it stopped.
* **Failures**: an unreadable file, an unsupported format, a level that does not exist or an empty tissue mask is
  reported with a one-line message naming the file; the batch goes on; the summary lists every failure (and every
  conversion warning: grey, RGBA, 16-bit), and is written to ``summary[_rank<r>].json``.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..data.io import IMAGE_SUFFIXES, write_json_atomic
from .outputs import (
    CocoResultsWriter,
    CsvWriter,
    GeoJSONWriter,
    LabelMapWriter,
    OverlayWriter,
    make_records,
)
from .predictor import Predictor
from .slide import TIFF_SUFFIXES, NoTissueError, open_image, tissue_mask

__all__ = ["OUTPUT_KINDS", "FileResult", "RunOptions", "RunSummary", "collect_inputs", "is_done", "merge_summaries",
           "output_paths", "predict_file", "run_batch"]

logger = logging.getLogger(__name__)

#: Output kinds and their file names (``{stem}`` = the input's name without suffix).
OUTPUT_KINDS = {
    "geojson": "{stem}.geojson",
    "coco": "{stem}.coco.json",
    "labels": "{stem}_labels{label_suffix}",
    "csv": "{stem}_nuclei.csv",
    "overlay": "{stem}_overlay.png",
}
INPUT_SUFFIXES = tuple(sorted(set(IMAGE_SUFFIXES) | set(TIFF_SUFFIXES)))


@dataclass
class RunOptions:
    """What to write and how to read the inputs.

    Attributes:
        outputs: any of :data:`OUTPUT_KINDS`.
        level: pyramid level to analyse (0 = full resolution); ignored when ``magnification`` is set.
        magnification: analyse the level closest to this objective power (needs it in the file's metadata).
        tissue_mask: skip tiles with no tissue in a mask computed from the thumbnail (slides).
        tissue_threshold: mean optical density above which a thumbnail pixel is tissue.
        label_suffix: ".tif" (default; large images become disk-mapped BigTIFFs), ".png" (<= 65,535 nuclei) or ".npy".
        overwrite: redo files whose outputs are complete.
        backend: image reader (see :func:`nuclei_d2.inference.slide.open_image`).
        class_names: names of the classes for GeoJSON.
    """

    outputs: Sequence[str] = ("geojson", "csv")
    level: int = 0
    magnification: float | None = None
    tissue_mask: bool = False
    tissue_threshold: float = 0.08
    label_suffix: str = ".tif"
    overwrite: bool = False
    backend: str = "auto"
    class_names: list[str] | None = None

    def __post_init__(self) -> None:
        bad = [o for o in self.outputs if o not in OUTPUT_KINDS]
        if bad:
            raise ValueError(f"unknown output kind(s) {bad}; choose from {list(OUTPUT_KINDS)}")
        if not self.outputs:
            raise ValueError("no outputs requested")


@dataclass
class FileResult:
    """What happened to one input."""

    input: str
    status: str  # "done", "skipped" (already done), "failed"
    outputs: dict[str, str] = field(default_factory=dict)
    nuclei: int = 0
    tiles: int = 0
    seconds: float = 0.0
    level: int = 0
    error: str = ""
    warnings: list[str] = field(default_factory=list)


@dataclass
class RunSummary:
    results: list[FileResult] = field(default_factory=list)

    @property
    def failures(self) -> list[FileResult]:
        return [r for r in self.results if r.status == "failed"]

    def counts(self) -> dict[str, int]:
        out = {"done": 0, "skipped": 0, "failed": 0}
        for r in self.results:
            out[r.status] = out.get(r.status, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"counts": self.counts(), "files": [asdict(r) for r in self.results]}

    def format(self) -> str:
        c = self.counts()
        lines = [f"{len(self.results)} input(s): {c['done']} done, {c['skipped']} skipped (already done), "
                 f"{c['failed']} failed"]
        for r in self.results:
            for w in r.warnings:
                lines.append(f"  warning: {w}")
        for r in self.failures:
            lines.append(f"  FAILED {r.input}: {r.error}")
        return "\n".join(lines)


def collect_inputs(inputs: Sequence[str | os.PathLike]) -> tuple[list[Path], list[FileResult]]:
    """Expand files, folders (recursive, image/slide suffixes) and glob patterns.

    Returns:
        (sorted unique input files, failures for arguments that match nothing).
    """
    files: list[Path] = []
    missing: list[FileResult] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in INPUT_SUFFIXES
                           and not q.name.startswith("."))
            if not found:
                missing.append(FileResult(str(p), "failed",
                                          error=f"folder has no images ({', '.join(INPUT_SUFFIXES)})"))
            files += found
        elif p.is_file():
            files.append(p)
        elif any(ch in str(item) for ch in "*?["):
            found = sorted(Path(g) for g in glob.glob(str(item), recursive=True) if Path(g).is_file())
            if not found:
                missing.append(FileResult(str(item), "failed", error="glob pattern matches no file"))
            files += found
        else:
            missing.append(FileResult(str(item), "failed", error="file not found"))
    seen, unique = set(), []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique, missing


def _stems(files: Sequence[Path]) -> dict[Path, str]:
    """Output stem per input: its name without suffix, prefixed by parent folders when names collide."""
    out: dict[Path, str] = {}
    by_stem: dict[str, list[Path]] = {}
    for f in files:
        by_stem.setdefault(f.stem, []).append(f)
    for stem, group in by_stem.items():
        for f in group:
            out[f] = stem if len(group) == 1 else "__".join([*f.resolve().parent.parts[-2:], stem])
    return out


def output_paths(output_dir: str | os.PathLike, stem: str, options: RunOptions) -> dict[str, Path]:
    d = Path(output_dir)
    return {k: d / OUTPUT_KINDS[k].format(stem=stem, label_suffix=options.label_suffix) for k in options.outputs}


def _marker(output_dir: str | os.PathLike, stem: str) -> Path:
    return Path(output_dir) / f"{stem}.done.json"


def is_done(output_dir: str | os.PathLike, stem: str, options: RunOptions) -> bool:
    """Are this input's requested outputs all written (marker present, every output file present)?"""
    m = _marker(output_dir, stem)
    if not m.is_file():
        return False
    try:
        done = json.loads(m.read_text())
    except (OSError, ValueError):
        return False
    paths = output_paths(output_dir, stem, options)
    return all(k in done.get("outputs", {}) and p.is_file() for k, p in paths.items())


def predict_file(predictor: Predictor, path: str | os.PathLike, output_dir: str | os.PathLike, options: RunOptions,
                 stem: str | None = None) -> FileResult:
    """Predict one image or slide and write its outputs (atomically; the done-marker last). Raises on failure."""
    path = Path(path)
    stem = stem or path.stem
    t0 = time.perf_counter()
    with open_image(path, options.backend) as src:
        level = src.level_for_magnification(options.magnification) if options.magnification else options.level
        level = src.check_level(level)
        height, width = src.level_dims[level]
        scale = src.downsample(level)
        tissue, tissue_ds = None, 1.0
        if options.tissue_mask:
            thumb, tissue_ds = src.thumbnail()
            tissue = tissue_mask(thumb, options.tissue_threshold)
            if not tissue.any():
                raise NoTissueError(f"{path}: the tissue mask is empty (no thumbnail pixel has mean optical density > "
                                    f"{options.tissue_threshold}); nothing to segment (lower --tissue-threshold or "
                                    "drop --tissue-mask)")
        paths = output_paths(output_dir, stem, options)
        writers: dict[str, Any] = {}
        try:
            for kind, p in paths.items():
                if kind == "geojson":
                    writers[kind] = GeoJSONWriter(p, scale=scale, class_names=options.class_names)
                elif kind == "coco":
                    writers[kind] = CocoResultsWriter(p, stem, (height, width))
                elif kind == "csv":
                    writers[kind] = CsvWriter(p)
                elif kind == "labels":
                    writers[kind] = LabelMapWriter(p, (height, width))
                elif kind == "overlay":
                    writers[kind] = OverlayWriter(p, (height, width))
            measure = "csv" in writers or "geojson" in writers
            next_id, n_tiles = 1, 0
            overlay = writers.get("overlay")
            for res in predictor.iter_tiles(src, level, tissue, tissue_ds, desc=path.name):
                n_tiles += 1
                if overlay is not None:
                    overlay.add_tile(res.image, res.tile.top, res.tile.left)
                records = make_records(res.crops, res.image, (res.tile.top, res.tile.left), next_id, scale, src.mpp,
                                       measure=measure)
                next_id += len(records)
                for w in writers.values():
                    w.add(records)
            written = {k: str(w.close()) for k, w in writers.items()}
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        result = FileResult(str(path), "done", written, next_id - 1, n_tiles, time.perf_counter() - t0, level,
                            warnings=list(src.warnings))
    write_json_atomic(_marker(output_dir, stem), {**asdict(result), "image_size": [height, width]}, indent=1)
    return result


def run_batch(predictor: Predictor, inputs: Sequence[str | os.PathLike], output_dir: str | os.PathLike,
              options: RunOptions | None = None, rank: int = 0, world: int = 1,
              on_file_done: Callable[[FileResult], None] | None = None) -> RunSummary:
    """Predict every input of this shard; never stops on a bad file (see the module docstring).

    Args:
        rank, world: this process's shard (inputs ``rank::world`` of the sorted list).
        on_file_done: called after each file (progress reporting; tests use it to simulate a kill).
    """
    options = options or RunOptions()
    if not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
    files, missing = collect_inputs(inputs)
    stems = _stems(files)
    summary = RunSummary(list(missing) if rank == 0 else [])
    mine = files[rank::world]
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    for f in mine:
        stem = stems[f]
        if not options.overwrite and is_done(output_dir, stem, options):
            res = FileResult(str(f), "skipped", {k: str(p) for k, p in output_paths(output_dir, stem, options).items()})
            logger.info("%s: outputs already complete, skipped", f)
        else:
            try:
                res = predict_file(predictor, f, output_dir, options, stem)
                logger.info("%s: %d nuclei, %d tiles, %.1f s", f, res.nuclei, res.tiles, res.seconds)
            except (KeyboardInterrupt, SystemExit):
                raise
            except MemoryError as e:
                res = FileResult(str(f), "failed", error=f"out of memory ({e}); use a smaller INFERENCE.BATCH_SIZE "
                                 "or TILE_SIZE")
            except Exception as e:  # one bad file must not stop the batch
                msg = str(e) if str(f) in str(e) else f"{type(e).__name__}: {e}"
                res = FileResult(str(f), "failed", error=msg)
                logger.error("%s: FAILED: %s", f, msg)
        summary.results.append(res)
        if on_file_done is not None:
            on_file_done(res)
    name = "summary.json" if world == 1 else f"summary_rank{rank}.json"
    write_json_atomic(Path(output_dir) / name, summary.to_dict(), indent=1)
    return summary


def merge_summaries(output_dir: str | os.PathLike, world: int) -> RunSummary:
    """Combine the per-rank summaries of a sharded run into ``summary.json`` (rank 0 calls it at the end)."""
    out = RunSummary()
    for r in range(world):
        p = Path(output_dir) / f"summary_rank{r}.json"
        if p.is_file():
            for item in json.loads(p.read_text())["files"]:
                out.results.append(FileResult(**item))
    out.results.sort(key=lambda r: r.input)
    write_json_atomic(Path(output_dir) / "summary.json", out.to_dict(), indent=1)
    return out


# ---- command line (tools/predict.py) ---------------------------------------------------------------------------------
def build_parser() -> Any:
    """The argument parser of ``tools/predict.py``."""
    import argparse

    p = argparse.ArgumentParser(
        description="Segment nuclei in images, folders, large tiles and whole slides with any nuclei-d2 model.",
        epilog="Example: python tools/predict.py --config-file configs/maskrcnn_baseline.yaml --weights "
               "model_final.pth --input slides/*.svs --output out --outputs geojson csv --level 0 --tissue-mask",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config-file", required=True, help="model config (the one it was trained with)")
    p.add_argument("--weights", default=None, help="trained weights (sets MODEL.WEIGHTS)")
    p.add_argument("--input", nargs="+", required=True, help="image files, folders or glob patterns")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--outputs", nargs="+", default=None, choices=list(OUTPUT_KINDS),
                   help="what to write (default INFERENCE.OUTPUTS)")
    p.add_argument("--level", type=int, default=0, help="pyramid level of slides to analyse (0 = full resolution)")
    p.add_argument("--magnification", type=float, default=None,
                   help="analyse the slide level closest to this objective power (e.g. 20)")
    p.add_argument("--tissue-mask", action="store_true", help="skip tiles without tissue (thumbnail mask)")
    p.add_argument("--tissue-threshold", type=float, default=0.08, help="optical density threshold of the mask")
    p.add_argument("--tile-size", type=int, default=None, help="tile side in px (default INFERENCE.TILE_SIZE)")
    p.add_argument("--overlap", type=int, default=None, help="tile overlap in px (default INFERENCE.OVERLAP)")
    p.add_argument("--batch-size", type=int, default=None, help="tiles per forward pass (INFERENCE.BATCH_SIZE)")
    p.add_argument("--label-format", default=".tif", choices=[".tif", ".png", ".npy"], help="label map format")
    p.add_argument("--backend", default="auto", choices=["auto", "tifffile", "tiffslide", "openslide", "pil"])
    p.add_argument("--overwrite", action="store_true", help="redo inputs whose outputs are complete")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--shard", default="0/1", help="K/N: process only the K-th of N shards of the inputs")
    p.add_argument("--num-gpus", type=int, default=1, help="processes per machine (Detectron2 launch)")
    p.add_argument("--num-machines", type=int, default=1)
    p.add_argument("--machine-rank", type=int, default=0)
    p.add_argument("--dist-url", default="auto")
    p.add_argument("opts", nargs="*", default=[], help="KEY VALUE config overrides (e.g. MODEL.DEVICE cpu)")
    return p


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError as e:
        raise ValueError(f"--shard must be K/N (e.g. 0/4), got {text!r}") from e
    if not 0 <= k < n:
        raise ValueError(f"--shard K/N needs 0 <= K < N, got {text!r}")
    return k, n


def predict_worker(args: Any) -> int:
    """One process of ``tools/predict.py`` (after Detectron2's ``launch``); returns the exit status."""
    from detectron2.utils import comm

    from ..engine.defaults import leave_process_group, setup_cfg

    opts = list(args.opts)
    if args.weights:
        opts += ["MODEL.WEIGHTS", args.weights]
    cfg = setup_cfg(args.config_file, opts, eval_only=True)
    if not cfg.MODEL.WEIGHTS:
        logger.warning("MODEL.WEIGHTS is empty: predicting with randomly initialised weights (testing only)")
    k, n = _parse_shard(args.shard)
    world, rank = comm.get_world_size() * n, k * comm.get_world_size() + comm.get_rank()
    predictor = Predictor(cfg, tile_size=args.tile_size, overlap=args.overlap, batch_size=args.batch_size,
                          progress=False if args.no_progress else None)
    options = RunOptions(outputs=args.outputs or list(cfg.INFERENCE.OUTPUTS), level=args.level,
                         magnification=args.magnification, tissue_mask=args.tissue_mask,
                         tissue_threshold=args.tissue_threshold, label_suffix=args.label_format,
                         overwrite=args.overwrite, backend=args.backend)
    summary = run_batch(predictor, args.input, args.output, options, rank=rank, world=world)
    if comm.get_world_size() > 1:
        comm.synchronize()
        if comm.is_main_process() and n == 1:
            summary = merge_summaries(args.output, world)
    if comm.is_main_process():
        print(summary.format())
    leave_process_group()
    return 1 if summary.failures else 0


def predict_main(argv: Sequence[str] | None = None) -> int:
    """``tools/predict.py``: parse, launch the workers, return the exit status (2: bad config or arguments)."""
    import sys

    from detectron2.engine import launch

    from ..engine.defaults import ConfigError

    args = build_parser().parse_args(argv)
    try:
        _parse_shard(args.shard)
        if args.num_gpus * args.num_machines > 1:
            launch(predict_worker, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                   dist_url=args.dist_url, args=(args,))
            # the workers' exit statuses are lost in launch: read the merged summary (machine 0) instead
            summary_path = Path(args.output) / "summary.json"
            if args.machine_rank == 0 and summary_path.is_file():
                return 1 if json.loads(summary_path.read_text())["counts"].get("failed", 0) else 0
            return 0
        return predict_worker(args)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
