"""Whole-slide / pyramid reading (nuclei_d2/inference/slide.py) and segmentation at chosen levels."""

from __future__ import annotations

import csv
import warnings

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from nuclei_d2.inference import Predictor, RunOptions, load_geojson, predict_file, run_batch
from nuclei_d2.inference.slide import NoTissueError, OpenSlideSource, open_image, tissue_mask
from nuclei_d2.structures import CropMasks
from nuclei_d2.utils.io import ImageReadError


def dark_blobs(tiles):
    """A fake model: connected components of dark pixels (the discs of :func:`disc_slide`)."""
    out = []
    for t in tiles:
        lab, n = ndimage.label(t.mean(axis=2) < 150)
        out.append(CropMasks.from_label_map(lab, np.full(n, 0.9) if n else None))
    return out


def disc_slide(h: int = 400, w: int = 360, spacing: int = 40, r: int = 9, tissue_cols: int | None = None):
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.full((h, w, 3), 240, np.uint8)
    centres = [(y, x) for y in range(spacing // 2, h - r, spacing) for x in range(spacing // 2, w - r, spacing)
               if tissue_cols is None or x < tissue_cols]
    for cy, cx in centres:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = (70, 40, 130)
    if tissue_cols is not None:
        img[:, :tissue_cols] = np.minimum(img[:, :tissue_cols], 200)  # pink-ish tissue background
    return img, centres


def write_pyramid(path, img, tile=(64, 64)):
    """A pyramidal TIFF (level 0 + one 2x reduced sub-IFD), tiled, as tifffile writes them."""
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, tile=tile, subifds=1, photometric="rgb", compression="zlib",
                 description="Aperio Image Library |AppMag = 40|MPP = 0.25")
        tw.write(img[::2, ::2], tile=tile, subfiletype=1, photometric="rgb", compression="zlib")


def test_pyramid_levels_and_regions(tmp_path):
    img, _ = disc_slide()
    write_pyramid(tmp_path / "s.tif", img)
    with open_image(tmp_path / "s.tif") as src:
        assert src.level_dims == [(400, 360), (200, 180)]
        assert src.downsample(1) == 2.0 and src.mpp == 0.25 and src.magnification == 40
        assert np.array_equal(src.read_region(0, 37, 50, 130, 200), img[37:167, 50:250])
        assert np.array_equal(src.read_region(1, 10, 3, 190, 170), img[::2, ::2][10:200, 3:173])
        assert src.level_for_magnification(20) == 1
        with pytest.raises(ImageReadError, match=r"s\.tif: level 2 does not exist .*2 level"):
            src.read_region(2, 0, 0, 10, 10)


def test_stripped_tiff_regions(tmp_path):
    img, _ = disc_slide(130, 90)
    tifffile.imwrite(tmp_path / "strips.tif", img, rowsperstrip=16, photometric="rgb")
    with open_image(tmp_path / "strips.tif") as src:
        assert np.array_equal(src.read_region(0, 20, 7, 50, 60), img[20:70, 7:67])


def test_segment_pyramid_at_level_0_and_1(tmp_path):
    img, centres = disc_slide()
    write_pyramid(tmp_path / "s.tif", img)
    pred = Predictor(tile_fn=dark_blobs, tile_size=96, overlap=32, progress=False)
    found = {}
    for level in (0, 1):
        out = tmp_path / f"out{level}"
        res = predict_file(pred, tmp_path / "s.tif", out, RunOptions(outputs=["geojson", "csv"], level=level))
        assert res.status == "done" and res.level == level and res.nuclei == len(centres)
        feats = load_geojson(out / "s.geojson")
        # level-0 coordinates in both cases
        found[level] = sorted((round(g.centroid.y), round(g.centroid.x)) for g, _ in feats)
        assert all(g.is_valid for g, _ in feats)
    for (y0, x0), (y1, x1), (cy, cx) in zip(found[0], found[1], sorted(centres)):
        assert abs(y0 - cy - 0.5) <= 1 and abs(x0 - cx - 0.5) <= 1
        assert abs(y1 - y0) <= 2 and abs(x1 - x0) <= 2


def test_magnification_picks_the_level(tmp_path):
    img, centres = disc_slide()
    write_pyramid(tmp_path / "s.tif", img)
    pred = Predictor(tile_fn=dark_blobs, tile_size=96, overlap=32, progress=False)
    res = predict_file(pred, tmp_path / "s.tif", tmp_path / "o", RunOptions(outputs=["csv"], magnification=20))
    assert res.level == 1


def test_tissue_mask_skips_glass_and_empty_mask_fails(tmp_path):
    img, centres = disc_slide(300, 400, tissue_cols=150)
    write_pyramid(tmp_path / "half.tif", img)
    white = np.full((200, 200, 3), 245, np.uint8)
    write_pyramid(tmp_path / "glass.tif", white)
    thumb = img[::4, ::4]
    mask = tissue_mask(thumb)
    assert mask[:, :30].mean() > 0.9 and not mask[:, 45:].any()

    pred = Predictor(tile_fn=dark_blobs, tile_size=96, overlap=32, progress=False)
    opts = RunOptions(outputs=["csv"], tissue_mask=True)
    res = predict_file(pred, tmp_path / "half.tif", tmp_path / "o", opts)
    full = predict_file(pred, tmp_path / "half.tif", tmp_path / "o2", RunOptions(outputs=["csv"]))
    assert res.nuclei == full.nuclei == len(centres)
    assert res.tiles < full.tiles
    summary = run_batch(pred, [tmp_path / "glass.tif"], tmp_path / "o3", opts)
    assert summary.counts()["failed"] == 1
    assert "glass.tif" in summary.failures[0].error and "tissue mask is empty" in summary.failures[0].error
    with pytest.raises(NoTissueError):
        predict_file(pred, tmp_path / "glass.tif", tmp_path / "o4", opts)


def write_svs_like(path, img, tile=(64, 64)):
    """Level 0 and a 2x reduced level as top-level tiled pages with Aperio descriptions (how SVS files are laid
    out), which both tiffslide and OpenSlide read as a two-level pyramid."""
    h, w = img.shape[:2]
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, tile=tile, photometric="rgb", compression="zlib",
                 description=f"Aperio Image Library v12.0.0\n{w}x{h} [0,0 {w}x{h}] (64x64) |AppMag = 40|MPP = 0.25")
        tw.write(img[::2, ::2], tile=tile, photometric="rgb", compression="zlib", subfiletype=1,
                 description=f"Aperio Image Library v12.0.0\n{w // 2}x{h // 2} -> {w // 2}x{h // 2}")


@pytest.mark.parametrize("backend", ["tiffslide", "openslide"])
def test_optional_backends_read_levels_regions_and_segment(tmp_path, backend):
    pytest.importorskip(backend, reason=f"optional whole-slide backend {backend} not installed")
    img, centres = disc_slide()
    write_svs_like(tmp_path / "s.tif", img)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. tiffslide's "aliasing TiffSlide to OpenSlide"
        src = open_image(tmp_path / "s.tif", backend)
    with src:
        assert src.level_dims == [(400, 360), (200, 180)] and src.downsample(1) == 2.0
        assert np.array_equal(src.read_region(0, 37, 50, 130, 200), img[37:167, 50:250])
        assert np.array_equal(src.read_region(1, 10, 3, 190, 170), img[::2, ::2][10:200, 3:173])
        if backend == "tiffslide":  # OpenSlide calls this layout "generic-tiff" and reads no Aperio metadata
            assert src.mpp == 0.25 and src.magnification == 40 and src.level_for_magnification(20) == 1
    pred = Predictor(tile_fn=dark_blobs, tile_size=96, overlap=32, progress=False)
    counts = {}
    for b in ("tifffile", backend):
        res = predict_file(pred, tmp_path / "s.tif", tmp_path / b, RunOptions(outputs=["geojson"], level=1, backend=b))
        feats = load_geojson(tmp_path / b / "s.geojson")
        counts[b] = (res.nuclei, sorted((round(g.centroid.y), round(g.centroid.x)) for g, _ in feats))
    assert counts[backend] == counts["tifffile"] and counts[backend][0] == len(centres)


@pytest.mark.parametrize("backend", ["tiffslide", "openslide"])
def test_optional_backends_name_the_file_they_cannot_open(tmp_path, backend):
    pytest.importorskip(backend, reason=f"optional whole-slide backend {backend} not installed")
    (tmp_path / "broken.svs").write_bytes(b"II*\x00" + b"\x00" * 20)
    with pytest.raises(ImageReadError, match=rf"broken\.svs: {backend} cannot open it"):
        open_image(tmp_path / "broken.svs", backend)


def test_missing_backend_says_how_to_install(tmp_path):
    write_pyramid(tmp_path / "s.tif", disc_slide()[0])
    with pytest.raises(ImageReadError, match=r"s\.tif: backend 'no_such_slide_lib' is not installed"):
        OpenSlideSource(tmp_path / "s.tif", "no_such_slide_lib")


# --- pixel size and magnification from generic TIFF metadata (issue 22) ---------------------------------------------


def write_plain_pyramid(path, img, tile=(64, 64), top_level=False, **tags):
    """A pyramidal TIFF without any Aperio description; ``tags`` (resolution, resolutionunit, metadata, description)
    go to level 0, the 2x reduced level (a sub-IFD, or with ``top_level`` a second page, which OpenSlide needs)
    gets none."""
    with tifffile.TiffWriter(path, ome=tags.pop("ome", False)) as tw:
        tw.write(img, tile=tile, subifds=0 if top_level else 1, photometric="rgb", compression="zlib", **tags)
        tw.write(img[::2, ::2], tile=tile, subfiletype=1, photometric="rgb", compression="zlib")


def test_resolution_tags_give_pixel_size_and_derived_magnification(tmp_path):
    img, _ = disc_slide()
    write_plain_pyramid(tmp_path / "cm.tif", img, resolution=(40000, 40000), resolutionunit="CENTIMETER")
    write_plain_pyramid(tmp_path / "inch.tif", img, resolution=(50800, 50800), resolutionunit="INCH")
    with open_image(tmp_path / "cm.tif") as src:
        assert src.mpp == pytest.approx(0.25) and src.mpp_source == "tiff-resolution"
        assert src.magnification == pytest.approx(40) and src.magnification_source == "derived"
        assert src.level_mpp(1) == pytest.approx(0.5)
        assert src.level_for_magnification(20) == 1 and src.level_for_magnification(40) == 0
        assert any("derived from the pixel size" in w for w in src.warnings)  # said where the level was chosen
    with open_image(tmp_path / "inch.tif") as src:  # 50800 dpi = 0.5 µm/px
        assert src.mpp == pytest.approx(0.5) and src.magnification == pytest.approx(20)
        assert src.level_for_magnification(20) == 0 and src.level_for_magnification(10) == 1


def test_ome_physical_size_and_objective(tmp_path):
    img, _ = disc_slide()
    um = {"PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5, "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"}
    write_plain_pyramid(tmp_path / "um.ome.tif", img, ome=True, metadata=um)
    nm = {"PhysicalSizeX": 250, "PhysicalSizeY": 250, "PhysicalSizeXUnit": "nm", "PhysicalSizeYUnit": "nm"}
    write_plain_pyramid(tmp_path / "nm.ome.tif", img, ome=True, metadata=nm)
    with open_image(tmp_path / "um.ome.tif") as src:
        assert src.mpp == pytest.approx(0.5) and src.mpp_source == "ome"
        assert src.magnification == pytest.approx(20) and src.magnification_source == "derived"
        assert src.level_for_magnification(10) == 1
    with open_image(tmp_path / "nm.ome.tif") as src:
        assert src.mpp == pytest.approx(0.25) and src.magnification == pytest.approx(40)
    # the objective's NominalMagnification wins over the derived value (a 20x objective scanned at 0.25 µm/px)
    with tifffile.TiffFile(tmp_path / "nm.ome.tif") as tf:
        xml = tf.ome_metadata
    objective = '<Instrument ID="Instrument:0"><Objective ID="Objective:0:0" NominalMagnification="20.0"/></Instrument>'
    xml = xml.replace('<Image ID="Image:0" Name="Image0">', objective + '<Image ID="Image:0" Name="Image0">'
                      '<InstrumentRef ID="Instrument:0"/><ObjectiveSettings ID="Objective:0:0"/>')
    write_plain_pyramid(tmp_path / "obj.ome.tif", img, description=xml.encode(), metadata=None)
    with open_image(tmp_path / "obj.ome.tif") as src:
        assert src.mpp == pytest.approx(0.25) and src.mpp_source == "ome"
        assert src.magnification == 20 and src.magnification_source == "ome"
        assert src.level_for_magnification(20) == 0 and not src.warnings


def test_meaningless_resolution_gives_no_pixel_size(tmp_path):
    """Screenshots and image editors write 72 or 96 dpi, or a resolution without unit: not a microscope's pixels."""
    img, centres = disc_slide()
    tifffile.imwrite(tmp_path / "dpi72.tif", img, photometric="rgb", resolution=(72, 72), resolutionunit="INCH")
    tifffile.imwrite(tmp_path / "dpi96.tif", img, photometric="rgb", resolution=(96, 96), resolutionunit="INCH")
    tifffile.imwrite(tmp_path / "nounit.tif", img, photometric="rgb", resolution=(40000, 40000),
                     resolutionunit="NONE")
    tifffile.imwrite(tmp_path / "default.tif", img, photometric="rgb")
    for name in ("dpi72", "dpi96", "nounit", "default"):
        with open_image(tmp_path / f"{name}.tif") as src:
            assert src.mpp is None and src.magnification is None, name
            with pytest.raises(ImageReadError, match=rf"{name}\.tif: the file records neither its magnification nor"):
                src.level_for_magnification(20)
    pred = Predictor(tile_fn=dark_blobs, tile_size=96, overlap=32, progress=False)
    predict_file(pred, tmp_path / "dpi72.tif", tmp_path / "o", RunOptions(outputs=["csv"]))
    rows = list(csv.DictReader(open(tmp_path / "o" / "dpi72_nuclei.csv")))
    assert len(rows) == len(centres) and all(r["area"] and not r["area_um2"] for r in rows)


def test_imagej_unit_non_square_pixels_and_garbled_aperio_fields(tmp_path):
    img, _ = disc_slide(64, 64)
    # Fiji/ImageJ: pixels per micron in unit-less tags, the unit in its description
    tifffile.imwrite(tmp_path / "ij.tif", img, imagej=True, resolution=(2.0, 2.0), metadata={"unit": "um"})
    with open_image(tmp_path / "ij.tif") as src:
        assert src.mpp == pytest.approx(0.5) and src.mpp_source == "imagej" and src.magnification == pytest.approx(20)
    tifffile.imwrite(tmp_path / "rect.tif", img, photometric="rgb", resolution=(40000, 20000),
                     resolutionunit="CENTIMETER")
    with open_image(tmp_path / "rect.tif") as src:
        assert src.mpp == pytest.approx(0.25) and any("not square (0.25 x 0.5 µm)" in w for w in src.warnings)
    # an unparsable Aperio MPP is skipped (it was a ValueError), the resolution tags then give the pixel size
    tifffile.imwrite(tmp_path / "odd.svs", img, photometric="rgb", resolution=(20000, 20000),
                     resolutionunit="CENTIMETER", description="Aperio Image Library |AppMag = 20|MPP = .")
    with open_image(tmp_path / "odd.svs") as src:
        assert src.mpp == pytest.approx(0.5) and src.mpp_source == "tiff-resolution"
        assert src.magnification == 20 and src.magnification_source == "aperio"


@pytest.mark.parametrize("backend", ["tiffslide", "openslide"])
def test_optional_backends_pixel_size(tmp_path, backend):
    """The same pixel size from tiffslide/OpenSlide's properties (from the resolution tags), the same rules."""
    pytest.importorskip(backend, reason=f"optional whole-slide backend {backend} not installed")
    img, _ = disc_slide()
    write_plain_pyramid(tmp_path / "cm.tif", img, top_level=True, resolution=(40000, 40000),
                        resolutionunit="CENTIMETER")
    with open_image(tmp_path / "cm.tif", backend) as src:
        assert src.mpp == pytest.approx(0.25) and src.mpp_source == backend
        assert src.magnification == pytest.approx(40) and src.magnification_source == "derived"
        assert src.level_for_magnification(20) == 1
    write_plain_pyramid(tmp_path / "dpi72.tif", img, top_level=True, resolution=(72, 72), resolutionunit="INCH")
    with open_image(tmp_path / "dpi72.tif", backend) as src:  # tiffslide's own mpp-x is 352.8 (25400 / 72)
        assert src.mpp is None and src.magnification is None


def test_predict_csv_in_microns_on_a_resolution_tagged_pyramid(tmp_path):
    """A real (tiny, random-init) model at --magnification 20 on a generic pyramidal TIFF: level 1 is analysed and
    the CSV has µm measurements from the resolution tags (0.25 µm/px at level 0, so 0.5 at level 1)."""
    from conftest import tiny_cfg

    from nuclei_d2.engine import RANDOM_INIT_OPTS

    img, _ = disc_slide(256, 256)
    write_plain_pyramid(tmp_path / "s.tif", img, resolution=(40000, 40000), resolutionunit="CENTIMETER")
    cfg = tiny_cfg("maskrcnn_baseline-tiny.yaml", *RANDOM_INIT_OPTS, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
                   "TEST.DETECTIONS_PER_IMAGE", "20")
    pred = Predictor(cfg, tile_size=128, overlap=32, batch_size=1, progress=False)
    res = predict_file(pred, tmp_path / "s.tif", tmp_path / "o", RunOptions(outputs=["csv"], magnification=20))
    assert res.level == 1 and res.nuclei > 0
    rows = list(csv.DictReader(open(tmp_path / "o" / "s_nuclei.csv")))
    assert len(rows) == res.nuclei
    for r in rows:
        assert float(r["area_um2"]) == pytest.approx(float(r["area"]) * 0.25, rel=1e-3, abs=1e-3)
        assert float(r["perimeter_um"]) == pytest.approx(float(r["perimeter"]) * 0.5, rel=1e-3, abs=1e-3)
