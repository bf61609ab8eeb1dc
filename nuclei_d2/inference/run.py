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
* **Output folder**: checked (created, a file written and removed) before the model is built or any input read, so
  an unusable ``--output`` fails at once with one line naming it.
* **Interrupts**: SIGINT (Ctrl-C) and SIGTERM become :class:`Interrupted`: the file being predicted removes its
  temporary outputs, the summary (done, interrupted, not started, how to resume) is printed and written, and the
  exit status is ``128 + signal`` (130, 143). Temporary files a hard kill (SIGKILL) leaves behind are removed by
  the next run (:func:`remove_stale_temps`, this run's own names only).
* **Slide resume**: the finished tiles of an input of several tiles are kept in ``<stem>.partial/``
  (:mod:`nuclei_d2.inference.resume`) until its outputs are written; a rerun predicts only the other tiles.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..utils.io import IMAGE_SUFFIXES, check_output_dir, write_json_atomic
from .outputs import (
    CocoResultsWriter,
    CsvWriter,
    GeoJSONWriter,
    LabelMapWriter,
    OverlayWriter,
    make_records,
)
from .predictor import Predictor, TileResult, _has_tissue, disjoint_tiles
from .resume import TileStore, partial_dir
from .slide import TIFF_SUFFIXES, ImageSource, NoTissueError, open_image, tissue_mask
from .stitching import Tile, owned_selection

__all__ = ["OUTPUT_KINDS", "FileResult", "Interrupted", "OutputError", "RunOptions", "RunSummary", "collect_inputs",
           "is_done", "merge_summaries", "output_paths", "predict_file", "prepare_output_dir", "remove_stale_temps",
           "run_batch"]

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


class OutputError(ValueError):
    """The output folder cannot be used (it is a file, lies under a file, or cannot be written). Names the path."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT (Ctrl-C) or SIGTERM; :func:`run_batch` attaches the summary of what it finished."""

    def __init__(self, signum: int = signal.SIGINT, summary: RunSummary | None = None):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)
        self.summary = summary

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum


@contextlib.contextmanager
def raise_on_signals(signums: Sequence[int] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Turn SIGINT / SIGTERM into :class:`Interrupted` inside the block, so ``finally`` / ``except`` clean-ups run
    (temporary outputs removed, summary written) instead of the process dying where it stands. A second signal
    during that clean-up is ignored. Outside the main thread (where Python cannot install handlers) a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if fired:  # already shutting down cleanly
            return
        fired.append(signum)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def prepare_output_dir(output_dir: str | os.PathLike) -> list[Path]:
    """Create the output folder and check that a file can be written in it, before any work is done.

    Returns:
        the folders this call created (outermost first), so a run that fails before writing can remove them.

    Raises:
        OutputError: one line naming the path: it is a file, lies under a file, or cannot be created or written.
    """
    out = check_output_dir(output_dir, "output folder (--output)", OutputError)
    created, p = [], out
    while not p.exists() and p != p.parent:
        created.append(p)
        p = p.parent
    created.reverse()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _remove_empty(created)
        raise OutputError(f"{out}: cannot create the output folder ({e.strerror or e})") from e
    return created


def _remove_empty(folders: Sequence[Path]) -> None:
    """Remove ``folders`` (outermost first) if they are empty: a run that wrote nothing leaves nothing."""
    for d in reversed(list(folders)):
        try:
            d.rmdir()
        except OSError:
            return


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
        resume: keep the finished tiles of inputs of several tiles in ``<stem>.partial/`` and reuse them after a
            kill (:mod:`nuclei_d2.inference.resume`).
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
    resume: bool = True

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
    status: str  # "done", "skipped" (already done), "failed", "interrupted", "not started"
    outputs: dict[str, str] = field(default_factory=dict)
    nuclei: int = 0
    tiles: int = 0
    seconds: float = 0.0
    level: int = 0
    error: str = ""
    warnings: list[str] = field(default_factory=list)
    reused_tiles: int = 0  # tiles loaded from <stem>.partial/ (finished before an interruption), not predicted


@dataclass
class RunSummary:
    results: list[FileResult] = field(default_factory=list)
    interrupted: str = ""  # the signal that stopped the run ("SIGINT", "SIGTERM"), if one did

    @property
    def failures(self) -> list[FileResult]:
        return [r for r in self.results if r.status == "failed"]

    def counts(self) -> dict[str, int]:
        out = {"done": 0, "skipped": 0, "failed": 0}
        if self.interrupted:
            out.update({"interrupted": 0, "not started": 0})
        for r in self.results:
            out[r.status] = out.get(r.status, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        out = {"counts": self.counts(), "files": [asdict(r) for r in self.results]}
        if self.interrupted:
            out["interrupted"] = self.interrupted
        return out

    def format(self) -> str:
        c = self.counts()
        head = (f"{len(self.results)} input(s): {c['done']} done, {c['skipped']} skipped (already done), "
                f"{c['failed']} failed")
        if self.interrupted:
            head += f", {c['interrupted']} interrupted, {c['not started']} not started"
        lines = [head]
        for r in self.results:
            for w in r.warnings:
                lines.append(f"  warning: {w}")
        for r in self.failures:
            lines.append(f"  FAILED {r.input}: {r.error}")
        if self.interrupted:
            for r in self.results:
                if r.status == "interrupted":
                    lines.append(f"  INTERRUPTED {r.input}: {r.error}")
            waiting = [r.input for r in self.results if r.status == "not started"]
            if waiting:
                more = f" and {len(waiting) - 5} more" if len(waiting) > 5 else ""
                lines.append(f"  not started: {', '.join(waiting[:5])}{more}")
            lines.append(f"Interrupted by {self.interrupted}. To resume, run the same command again: finished "
                         "inputs are skipped and the finished tiles of an interrupted slide are reused.")
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


def _output_names(stem: str) -> list[str]:
    """Every file name a run may write for input ``stem`` (all kinds and label formats, and the done-marker)."""
    names = {OUTPUT_KINDS[k].format(stem=stem, label_suffix=sfx) for k in OUTPUT_KINDS for sfx in (".tif", ".png",
                                                                                                      ".npy")}
    return sorted(names | {f"{stem}.done.json"})


#: ``.<name's stem>.<8 random characters>.tmp<name's suffix>``: the temporary files of
#: :func:`nuclei_d2.utils.io.atomic_write` and of the streaming writers (``tempfile.mkstemp`` names).
_TEMP_NAME = re.compile(r"^\.(?P<stem>.+)\.[a-z0-9_]{8}\.tmp(?P<suffix>\.[^.]+)$")


def remove_stale_temps(output_dir: str | os.PathLike, names: Sequence[str]) -> list[Path]:
    """Remove the temporary files a killed run left for the output files ``names`` (see :data:`_TEMP_NAME`).

    Only temporaries of these names are touched: other files, and other shards' temporaries (their inputs' names
    are not in ``names``), stay. Returns the removed paths.
    """
    wanted = {(Path(n).stem, Path(n).suffix) for n in names}
    removed = []
    for p in Path(output_dir).iterdir():
        m = _TEMP_NAME.match(p.name)
        if m and (m["stem"], m["suffix"]) in wanted and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _tiles(predictor: Predictor, src: ImageSource, level: int, tissue: Any, tissue_ds: float) -> list[Tile]:
    """The tiles :meth:`Predictor.iter_tiles` visits (the grid, minus tiles without tissue)."""
    height, width = src.level_dims[level]
    tiles = list(predictor.grid(height, width))
    if tissue is not None:
        scale = src.downsample(level) / tissue_ds
        tiles = [t for t in tiles if _has_tissue(tissue, t, scale)]
    return tiles


def _manifest(predictor: Predictor, path: Path, level: int, tiles: list[Tile]) -> dict[str, Any]:
    """What an input's tile results depend on: a resume with anything different starts over."""
    st = path.stat()
    cfg = predictor.cfg
    config = hashlib.sha256(cfg.dump().encode()).hexdigest() if hasattr(cfg, "dump") else None
    weights: dict[str, Any] = {}
    if config is not None and cfg.MODEL.WEIGHTS:
        weights["path"] = str(cfg.MODEL.WEIGHTS)
        if os.path.isfile(cfg.MODEL.WEIGHTS):
            ws = os.stat(cfg.MODEL.WEIGHTS)
            weights.update(size=ws.st_size, mtime_ns=ws.st_mtime_ns)
    fn = predictor._tile_fn if predictor.model is None else None
    return {"format": 1, "input": str(path.resolve()), "input_size": st.st_size, "input_mtime_ns": st.st_mtime_ns,
            "level": level, "tile_size": predictor.tile_size, "overlap": predictor.overlap,
            "score_threshold": predictor.score_threshold, "tiles": len(tiles), "config_sha256": config,
            "weights": weights,
            "tile_fn": None if fn is None else f"{fn.__module__}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"}


def _resumable_tiles(predictor: Predictor, src: ImageSource, level: int, tiles: list[Tile], store: TileStore,
                     need_image: bool, desc: str) -> Iterator[TileResult]:
    """:meth:`Predictor.iter_tiles` over ``tiles``, reusing the tiles ``store`` holds and keeping the others there.

    Tiles are yielded in grid order (so nucleus ids are those of an uninterrupted run); a batch's tiles are all kept
    before any of them is yielded, so finished tiles are whole batches and a resumed run batches like a fresh one.
    ``need_image``: read the pixels of reused tiles too (measurements, overlay).
    """
    size = src.level_dims[level]
    bar = None
    if predictor.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tiles), desc=desc, unit="tile", dynamic_ncols=True, leave=False)
    try:
        i = 0
        while i < len(tiles):
            t = tiles[i]
            if t.index in store.done:
                crops = store.load(t.index)
                if crops is None:  # damaged: forgotten by the store, predicted below
                    continue
                image = src.read_region(level, t.top, t.left, t.height, t.width) if need_image else None
                i += 1
                if bar is not None:
                    bar.update(1)
                yield TileResult(t, crops, image)
                continue
            batch: list[Tile] = []
            while i < len(tiles) and len(batch) < predictor.batch_size and tiles[i].index not in store.done:
                batch.append(tiles[i])
                i += 1
            images = [src.read_region(level, b.top, b.left, b.height, b.width) for b in batch]
            preds = predictor._tile_fn(images)  # the model on a batch of tiles, as in Predictor.iter_tiles
            if len(preds) != len(batch):
                raise RuntimeError(f"the tile function returned {len(preds)} results for {len(batch)} tiles")
            results = [TileResult(b, owned_selection(c, b, size), img) for b, img, c in zip(batch, images, preds)]
            for r in results:
                store.save(r.tile.index, r.crops)
            if bar is not None:
                bar.update(len(batch))
            yield from results
    finally:
        if bar is not None:
            bar.close()


def predict_file(predictor: Predictor, path: str | os.PathLike, output_dir: str | os.PathLike, options: RunOptions,
                 stem: str | None = None) -> FileResult:
    """Predict one image or slide and write its outputs (atomically; the done-marker last). Raises on failure.

    An input of several tiles keeps its finished tiles in ``<stem>.partial/`` (``options.resume``) and reuses those
    a killed run left; the folder is removed once the done-marker is written.
    """
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
        tiles = _tiles(predictor, src, level, tissue, tissue_ds)
        store = None
        if options.resume and len(tiles) > 1:
            store = TileStore(partial_dir(output_dir, stem), _manifest(predictor, path, level, tiles),
                              fresh=options.overwrite)
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
            if store is None:
                results = predictor.iter_tiles(src, level, tissue, tissue_ds, desc=path.name)
            else:
                results = disjoint_tiles(_resumable_tiles(predictor, src, level, tiles, store,
                                                          measure or overlay is not None, path.name),
                                         predictor.grid(height, width))
            for res in results:
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
            for w in writers.values():  # each removes its temporary file, even if another one's removal fails
                try:
                    w.abort()
                except Exception as e:
                    logger.error("%s: could not remove a temporary output (%s: %s)", path, type(e).__name__, e)
            raise
        result = FileResult(str(path), "done", written, next_id - 1, n_tiles, time.perf_counter() - t0, level,
                            warnings=list(src.warnings), reused_tiles=store.reused if store is not None else 0)
    write_json_atomic(_marker(output_dir, stem), {**asdict(result), "image_size": [height, width]}, indent=1)
    if store is not None:
        store.remove()
    return result


def _interrupted_note(output_dir: Path, stem: str) -> str:
    """What an interrupted input keeps for the next run."""
    d = partial_dir(output_dir, stem)
    done = len(list(d.glob("tile_*.npz"))) if d.is_dir() else 0
    if not done:
        return "stopped before any of its tiles was finished; it starts over on the next run"
    try:
        total = json.loads((d / "manifest.json").read_text())["tiles"]
    except (OSError, ValueError, KeyError):
        total = "?"
    return f"{done} of {total} tiles finished, kept in {d} for the next run"


def _os_error_text(e: OSError) -> str:
    """One line naming the path(s) of an OS error."""
    if e.filename is None:
        return str(e)
    where = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else str(e.filename)
    return f"{where}: {e.strerror or e}"


def run_batch(predictor: Predictor, inputs: Sequence[str | os.PathLike], output_dir: str | os.PathLike,
              options: RunOptions | None = None, rank: int = 0, world: int = 1,
              on_file_done: Callable[[FileResult], None] | None = None) -> RunSummary:
    """Predict every input of this shard; never stops on a bad file (see the module docstring).

    Args:
        rank, world: this process's shard (inputs ``rank::world`` of the sorted list).
        on_file_done: called after each file (progress reporting; tests use it to simulate a kill).

    Raises:
        Interrupted: on SIGINT / SIGTERM (see :func:`raise_on_signals`) or KeyboardInterrupt, after writing the
            summary (with the interrupted and not started inputs); the exception carries it.
    """
    options = options or RunOptions()
    if not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
    files, missing = collect_inputs(inputs)
    stems = _stems(files)
    summary = RunSummary(list(missing) if rank == 0 else [])
    mine = files[rank::world]
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "summary.json" if world == 1 else f"summary_rank{rank}.json"
    stale = remove_stale_temps(out_dir, [n for f in mine for n in _output_names(stems[f])] + [name])
    if stale:
        logger.info("%s: removed %d temporary file(s) left by a killed run", out_dir, len(stale))
    current: Path | None = None
    try:
        for f in mine:
            stem = stems[f]
            current = f
            if not options.overwrite and is_done(out_dir, stem, options):
                done = {k: str(p) for k, p in output_paths(out_dir, stem, options).items()}
                res = FileResult(str(f), "skipped", done)
                leftover = partial_dir(out_dir, stem)
                if leftover.is_dir():  # killed between the done-marker and the folder's removal
                    shutil.rmtree(leftover, ignore_errors=True)
                logger.info("%s: outputs already complete, skipped", f)
            else:
                try:
                    res = predict_file(predictor, f, out_dir, options, stem)
                    reused = f" ({res.reused_tiles} reused from an interrupted run)" if res.reused_tiles else ""
                    logger.info("%s: %d nuclei, %d tiles%s, %.1f s", f, res.nuclei, res.tiles, reused, res.seconds)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except MemoryError as e:
                    res = FileResult(str(f), "failed", error=f"out of memory ({e}); use a smaller "
                                     "INFERENCE.BATCH_SIZE or TILE_SIZE")
                except Exception as e:  # one bad file must not stop the batch
                    if isinstance(e, OSError) and e.filename is not None:
                        msg = _os_error_text(e)
                    else:
                        msg = str(e) if str(f) in str(e) else f"{type(e).__name__}: {e}"
                    res = FileResult(str(f), "failed", error=msg)
                    logger.error("%s: FAILED: %s", f, msg)
            current = None
            summary.results.append(res)
            if on_file_done is not None:
                on_file_done(res)
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        summary.interrupted = signal.Signals(signum).name
        seen = {r.input for r in summary.results}
        for f in mine:
            if str(f) in seen:
                continue
            if f == current:
                summary.results.append(FileResult(str(f), "interrupted", error=_interrupted_note(out_dir, stems[f])))
            else:
                summary.results.append(FileResult(str(f), "not started"))
        try:
            write_json_atomic(out_dir / name, summary.to_dict(), indent=1)
        except OSError as err:
            logger.error("cannot write the summary: %s", _os_error_text(err))
        raise Interrupted(signum, summary) from None
    write_json_atomic(out_dir / name, summary.to_dict(), indent=1)
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
