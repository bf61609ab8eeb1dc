"""Whole-slide / pyramid reading (nuclei_d2/inference/slide.py) and segmentation at chosen levels."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from nuclei_d2.data.io import ImageReadError
from nuclei_d2.inference import Predictor, RunOptions, load_geojson, predict_file, run_batch
from nuclei_d2.inference.slide import NoTissueError, OpenSlideSource, open_image, tissue_mask
from nuclei_d2.inference.stitching import crops_from_label_map


def dark_blobs(tiles):
    """A fake model: connected components of dark pixels (the discs of :func:`disc_slide`)."""
    out = []
    for t in tiles:
        lab, n = ndimage.label(t.mean(axis=2) < 150)
        out.append(crops_from_label_map(lab, np.full(n, 0.9) if n else None))
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
