"""What a prediction run writes: QuPath GeoJSON, COCO results, label maps, per-nucleus CSV measurements, overlays.

Every writer is *streaming* (``add`` one tile's nuclei at a time, then ``close``), so a whole slide never has to be
held in memory, and *atomic*: it writes to a temporary file in the output folder and moves it onto the final name
only in ``close`` (``abort`` removes it). A killed run therefore never leaves a half-written output behind.

Coordinates
-----------
* Nuclei are predicted in the frame of the analysed image (a slide's chosen pyramid level). GeoJSON geometry and the
  CSV centroids are multiplied by ``scale`` (the level's downsample), i.e. given in **level-0 pixel coordinates**, the
  frame QuPath uses when it opens the slide; for plain images ``scale`` is 1. Pixel ``(row r, column c)`` covers the
  square ``[c, c + 1] x [r, r + 1]`` (QuPath's convention), so a polygon traced around a mask follows pixel edges.
* COCO results and label maps stay in the analysed image's frame (they are image-sized rasters).
* CSV areas/perimeters are in analysed-image pixels; with a known pixel size (``mpp``, level 0) also in µm / µm².
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..structures import CropMasks
from ..utils.io import atomic_write, write_label_map

__all__ = ["CSV_COLUMNS", "CocoResultsWriter", "CsvWriter", "GeoJSONWriter", "LabelMapWriter", "NucleusRecord",
           "OverlayWriter", "load_geojson", "make_records", "mask_polygon",
           "nucleus_measurements"]

#: Columns of the per-nucleus CSV (``*_um`` columns are empty when the pixel size is unknown).
CSV_COLUMNS = ["id", "centroid_x", "centroid_y", "area", "perimeter", "eccentricity", "solidity", "mean_hematoxylin",
               "score", "class", "area_um2", "perimeter_um"]
NUCLEUS_COLOUR = (0, 200, 0)


def mask_polygon(mask: np.ndarray, left: float = 0.0, top: float = 0.0) -> Any:
    """A valid shapely ``Polygon`` outlining a bool mask crop whose top-left pixel is at ``(top, left)``.

    The outline joins the centres of the mask's boundary pixels (OpenCV border following, Suzuki & Abe 1985),
    expressed in QuPath's corner convention (the centre of pixel column ``c`` is ``x = c + 0.5``). Holes are ignored;
    for a mask in several pieces the largest piece's outline is returned; masks too thin to enclose an area (lines of
    pixels) get their bounding square. OpenCV is used instead of marching squares because it is ~50x faster, which
    matters with 10^5-10^6 nuclei per slide.
    """
    import cv2
    from shapely.geometry import Polygon, box
    from shapely.validation import make_valid

    m = np.ascontiguousarray(mask, dtype=np.uint8)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    best = None
    for c in contours:
        if len(c) < 3:
            continue
        pts = c[:, 0, :].astype(np.float64) + (left + 0.5, top + 0.5)
        poly = Polygon(pts)
        if not poly.is_valid:
            fixed = make_valid(poly)
            parts = [g for g in getattr(fixed, "geoms", [fixed]) if g.geom_type == "Polygon"]
            if not parts:
                continue
            poly = max(parts, key=lambda g: g.area)
        if poly.area > 0 and (best is None or poly.area > best.area):
            best = poly
    if best is None:  # a line or a few pixels: their bounding square
        ys, xs = np.nonzero(mask)
        return box(left + xs.min(), top + ys.min(), left + xs.max() + 1, top + ys.max() + 1)
    return Polygon(best.exterior.coords)


def nucleus_measurements(mask: np.ndarray, polygon: Any, intensity: np.ndarray | None = None
                         ) -> dict[str, float]:
    """Morphology of one nucleus (bool crop), in pixels of the crop.

    ``area``: pixel count; ``centroid_x/y``: mean pixel centre within the crop (corner convention); ``eccentricity``:
    of the ellipse with the same second central moments (0 = circle, as scikit-image's ``regionprops``);
    ``perimeter``: length of the outline ``polygon``; ``solidity``: pixel area / area of the convex hull of the
    pixels' squares;
    ``mean_hematoxylin``: mean of ``intensity`` over the mask (NaN without it).
    """
    ys, xs = np.nonzero(mask)
    area = float(ys.size)
    cy, cx = ys.mean(), xs.mean()
    dy, dx = ys - cy, xs - cx
    # Second central moments of the pixel centres (as scikit-image's regionprops).
    myy, mxx, mxy = (dy * dy).mean(), (dx * dx).mean(), (dx * dy).mean()
    common = np.sqrt(((mxx - myy) / 2) ** 2 + mxy * mxy)
    l1, l2 = (mxx + myy) / 2 + common, (mxx + myy) / 2 - common
    ecc = float(np.sqrt(max(0.0, 1 - l2 / l1))) if l1 > 0 else 0.0
    # Convex hull of the boundary pixels' squares (their corners), so solidity = pixels / hull pixels as for
    # regionprops' convex image, without rasterising the hull.
    from shapely.geometry import MultiPoint

    c = np.asarray(polygon.exterior.coords)
    corners = (c[:, None, :] + np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])).reshape(-1, 2)
    hull = MultiPoint(corners).convex_hull.area
    return {"centroid_x": float(cx + 0.5), "centroid_y": float(cy + 0.5), "area": area,
            "perimeter": float(polygon.length), "eccentricity": ecc,
            "solidity": float(min(1.0, area / hull)) if hull > 0 else 1.0,
            "mean_hematoxylin": float(intensity[mask].mean()) if intensity is not None else float("nan")}


@dataclass
class NucleusRecord:
    """One nucleus ready to be written: id, mask crop (analysed frame), polygon (analysed frame), measurements."""

    id: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (analysed frame, exclusive ends)
    mask: np.ndarray
    score: float
    cls: int
    polygon: Any
    measurements: dict[str, float]


def make_records(crops: CropMasks, image: np.ndarray | None, origin: tuple[int, int], first_id: int,
                 scale: float = 1.0, mpp: float | None = None, measure: bool = True) -> list[NucleusRecord]:
    """Records for the nuclei of one tile.

    Args:
        crops: nuclei (bool crops) in the analysed image's frame.
        image: the tile's RGB pixels (for the mean haematoxylin intensity), or None.
        origin: ``(top, left)`` of the tile in the analysed frame.
        first_id: id of the first nucleus (ids are consecutive).
        scale: level-0 pixels per analysed pixel (the centroids are reported in level-0 coordinates).
        mpp: level-0 microns per pixel, if known.
        measure: compute the morphology measurements (CSV); False leaves them empty.
    """
    hema = None
    if measure and image is not None and len(crops):
        from ..stain import hematoxylin_channel

        hema = hematoxylin_channel(image)
    out = []
    top, left = origin
    for k, (box, m) in enumerate(zip(crops.boxes, crops.masks)):
        x0, y0, x1, y1 = (int(v) for v in box)
        mask = np.asarray(m) >= 0.5
        poly = mask_polygon(mask, x0, y0)
        meas: dict[str, float] = {}
        if measure:
            inten = hema[y0 - top:y1 - top, x0 - left:x1 - left] if hema is not None else None
            if inten is not None and inten.shape != mask.shape:
                inten = None
            meas = nucleus_measurements(mask, poly, inten)  # shape measures are translation-invariant
            meas["centroid_x"] = (x0 + meas["centroid_x"]) * scale
            meas["centroid_y"] = (y0 + meas["centroid_y"]) * scale
            if mpp:
                um = mpp * scale
                meas["area_um2"] = meas["area"] * um * um
                meas["perimeter_um"] = meas["perimeter"] * um
        out.append(NucleusRecord(first_id + k, (x0, y0, x1, y1), mask, float(crops.scores[k]), int(crops.classes[k]),
                                 poly, meas))
    return out


class _StreamWriter:
    """Text written to a temporary file beside ``path``, moved onto ``path`` by :meth:`close`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=f".tmp{self.path.suffix}",
                                   dir=self.path.parent)
        self.tmp = Path(tmp)
        self.f = os.fdopen(fd, "w", newline="")

    def _finish(self) -> None:
        pass

    def close(self) -> Path:
        self._finish()
        self.f.close()
        os.chmod(self.tmp, 0o644)
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Remove the temporary file, whatever state it is in (closing it can fail: a full disk fails the flush)."""
        try:
            self.f.close()
        except OSError:
            pass
        finally:
            self.tmp.unlink(missing_ok=True)


class GeoJSONWriter(_StreamWriter):
    """QuPath-compatible GeoJSON: a FeatureCollection with one ``Polygon`` detection per nucleus.

    Each feature has ``properties``: ``objectType: "detection"``, ``classification`` (name + colour; QuPath shows it),
    ``measurements`` (score and the CSV's morphology when computed), and ``nucleus_id``, ``score``, ``class``.
    Drag the file onto the slide in QuPath (File > Import objects) to see the nuclei.
    """

    def __init__(self, path: str | os.PathLike, scale: float = 1.0, class_names: list[str] | None = None):
        super().__init__(path)
        self.scale = float(scale)
        self.class_names = class_names or ["Nucleus"]
        self.count = 0
        self.f.write('{"type": "FeatureCollection", "features": [\n')

    def add(self, records: list[NucleusRecord]) -> None:
        from shapely.affinity import scale as shp_scale

        for r in records:
            poly = r.polygon if self.scale == 1 else shp_scale(r.polygon, self.scale, self.scale, origin=(0, 0))
            coords = [[round(x, 2), round(y, 2)] for x, y in poly.exterior.coords]
            name = self.class_names[r.cls] if 0 <= r.cls < len(self.class_names) else f"class_{r.cls}"
            meas = {"score": round(r.score, 4)}
            meas.update({k: v for k, v in r.measurements.items() if np.isfinite(v)})
            feat = {"type": "Feature", "id": f"nucleus-{r.id}",
                    "geometry": {"type": "Polygon", "coordinates": [coords]},
                    "properties": {"objectType": "detection", "nucleus_id": r.id, "score": round(r.score, 4),
                                   "class": r.cls, "classification": {"name": name, "color": list(NUCLEUS_COLOUR)},
                                   "measurements": meas}}
            self.f.write((",\n" if self.count else "") + json.dumps(feat))
            self.count += 1

    def _finish(self) -> None:
        self.f.write("\n]}\n")


class CocoResultsWriter(_StreamWriter):
    """COCO results JSON (a list of ``{image_id, category_id, segmentation (RLE), bbox (XYWH), score}``), what
    ``pycocotools.COCOeval`` and Detectron2's COCOEvaluator read. ``category_id = class + category_offset``."""

    def __init__(self, path: str | os.PathLike, image_id: int | str, image_size: tuple[int, int],
                 category_offset: int = 1):
        super().__init__(path)
        self.image_id, self.size, self.offset = image_id, image_size, int(category_offset)
        self.count = 0
        self.f.write("[\n")

    def add(self, records: list[NucleusRecord]) -> None:
        from ..structures import mask_crop_to_rle

        h, w = self.size
        for r in records:
            x0, y0, x1, y1 = r.box
            item = {"image_id": self.image_id, "category_id": r.cls + self.offset,
                    "segmentation": mask_crop_to_rle(r.mask, y0, x0, h, w),
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], "score": round(r.score, 5)}
            self.f.write((",\n" if self.count else "") + json.dumps(item))
            self.count += 1

    def _finish(self) -> None:
        self.f.write("\n]\n")


class CsvWriter(_StreamWriter):
    """Per-nucleus measurements (:data:`CSV_COLUMNS`): centroid (level-0 px), area and perimeter (analysed px),
    eccentricity and solidity (scikit-image ``regionprops``), mean haematoxylin intensity (Ruifrok colour
    deconvolution, 0-1, :func:`nuclei_d2.stain.hematoxylin_channel`), score, class, and µm units when known."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self.w = csv.writer(self.f)
        self.w.writerow(CSV_COLUMNS)
        self.count = 0

    def add(self, records: list[NucleusRecord]) -> None:
        for r in records:
            m = r.measurements
            row: list[Any] = [r.id]
            for c in CSV_COLUMNS[1:]:
                if c == "score":
                    row.append(f"{r.score:.4f}")
                elif c == "class":
                    row.append(r.cls)
                elif c in m and np.isfinite(m[c]):
                    row.append(f"{m[c]:.4f}" if isinstance(m[c], float) else m[c])
                else:
                    row.append("")
            self.w.writerow(row)
            self.count += 1


class LabelMapWriter:
    """Instance label map (nucleus id = pixel value, 0 = background) in the analysed frame.

    Small images are painted in memory and written by :func:`nuclei_d2.utils.io.write_label_map` (PNG/TIFF/NPY).
    Images above ``memmap_pixels`` with a ``.tif`` name are painted straight into an uncompressed (Big)TIFF memory map
    on disk (``tifffile.memmap``), so the label map of a whole slide never sits in RAM. The nuclei it receives share no
    pixel (:func:`nuclei_d2.inference.predictor.disjoint_tiles` resolved overlaps once, for every writer), so each
    nucleus's pixels here are the ones its CSV row measures and its GeoJSON polygon outlines.
    """

    def __init__(self, path: str | os.PathLike, image_size: tuple[int, int], memmap_pixels: int = 8192 * 8192):
        self.path = Path(path)
        self.size = (int(image_size[0]), int(image_size[1]))
        self.tmp: Path | None = None
        n = self.size[0] * self.size[1]
        if n > memmap_pixels and self.path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=".tmp.tif", dir=self.path.parent)
            os.close(fd)
            self.tmp = Path(tmp)
            self.label = tifffile.memmap(self.tmp, shape=self.size, dtype=np.int32, bigtiff=n * 4 > 2**31)
        else:
            self.label = np.zeros(self.size, dtype=np.int32)

    def add(self, records: list[NucleusRecord]) -> None:
        for r in records:
            x0, y0, x1, y1 = r.box
            view = self.label[y0:y1, x0:x1]
            view[r.mask] = r.id

    def close(self) -> Path:
        if self.tmp is None:
            return write_label_map(self.path, self.label)
        self.label.flush()
        del self.label
        os.chmod(self.tmp, 0o644)
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)


class OverlayWriter:
    """A PNG of the nuclei outlines over the image.

    Images up to ``max_side`` px use :func:`nuclei_d2.inference.visualize.save_overlay` (exact inner outlines of the
    label map); larger ones (slides) are drawn on a copy downsampled to at most ``max_side`` px, assembled from the
    tiles as they are predicted, with the polygons drawn as lines.
    """

    def __init__(self, path: str | os.PathLike, image_size: tuple[int, int], max_side: int = 4096):
        self.path = Path(path)
        h, w = image_size
        self.step = max(1, int(np.ceil(max(h, w) / max_side)))
        self.canvas = np.full((-(-h // self.step), -(-w // self.step), 3), 255, np.uint8)
        self.label = np.zeros(image_size, np.int32) if self.step == 1 else None
        self.polys: list[np.ndarray] = []

    def add_tile(self, image: np.ndarray, top: int, left: int) -> None:
        s = self.step
        oy, ox = (-top) % s, (-left) % s  # first tile pixel on the subsampling grid
        sub = image[oy::s, ox::s]
        ty, tx = (top + oy) // s, (left + ox) // s
        hh, ww = min(sub.shape[0], self.canvas.shape[0] - ty), min(sub.shape[1], self.canvas.shape[1] - tx)
        self.canvas[ty:ty + hh, tx:tx + ww] = sub[:hh, :ww]

    def add(self, records: list[NucleusRecord]) -> None:
        for r in records:
            if self.label is not None:
                x0, y0, x1, y1 = r.box
                self.label[y0:y1, x0:x1][r.mask] = r.id
            else:
                self.polys.append(np.asarray(r.polygon.exterior.coords, np.float32) / self.step)

    def close(self) -> Path:
        if self.label is not None:
            from .visualize import save_overlay

            return save_overlay(self.path, self.canvas, self.label)
        import cv2
        from PIL import Image

        img = self.canvas.copy()
        pts = [np.round(p).astype(np.int32).reshape(-1, 1, 2) for p in self.polys]
        cv2.polylines(img, pts, isClosed=True, color=NUCLEUS_COLOUR, thickness=1)
        return atomic_write(self.path, lambda tmp: Image.fromarray(img).save(tmp, format="PNG"))

    def abort(self) -> None:
        pass


def load_geojson(path: str | os.PathLike) -> list[tuple[Any, dict[str, Any]]]:
    """Read back a GeoJSON written by :class:`GeoJSONWriter` (or QuPath): ``(shapely geometry, properties)`` pairs."""
    from shapely.geometry import shape

    with open(path) as f:
        data = json.load(f)
    feats = data["features"] if data.get("type") == "FeatureCollection" else [data]
    return [(shape(ft["geometry"]), ft.get("properties", {})) for ft in feats]
