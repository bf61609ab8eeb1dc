"""Prediction outputs (nuclei_d2/inference/outputs.py): GeoJSON, COCO results, CSV, label maps, overlays."""

from __future__ import annotations

import csv
import json

import numpy as np
import pycocotools.mask as mask_util
import pytest
from PIL import Image
from skimage.measure import regionprops

from nuclei_d2.data.synthetic import make_synthetic_tile
from nuclei_d2.inference.outputs import (
    CSV_COLUMNS,
    CocoResultsWriter,
    CsvWriter,
    GeoJSONWriter,
    LabelMapWriter,
    OverlayWriter,
    load_geojson,
    make_records,
    mask_polygon,
)
from nuclei_d2.stain import hematoxylin_channel
from nuclei_d2.structures import CropMasks
from nuclei_d2.utils.io import read_label_map


@pytest.fixture(scope="module")
def tile():
    image, label = make_synthetic_tile((150, 170), 7)
    return image, label, make_records(CropMasks.from_label_map(label), image, (0, 0), 1)


def test_geojson_valid_polygons_in_image_coordinates_and_loads_back(tmp_path, tile):
    image, label, records = tile
    h, w = label.shape
    w_ = GeoJSONWriter(tmp_path / "a.geojson")
    w_.add(records[:5])
    w_.add(records[5:])
    path = w_.close()
    raw = json.loads(path.read_text())
    assert raw["type"] == "FeatureCollection"
    feats = load_geojson(path)
    assert len(feats) == label.max() == len(records)
    props = regionprops(label)
    for (geom, prop), rp in zip(feats, props):
        assert geom.geom_type == "Polygon" and geom.is_valid
        x0, y0, x1, y1 = geom.bounds
        assert 0 <= x0 and 0 <= y0 and x1 <= w and y1 <= h
        # outline through boundary pixel centres: inside the pixel bounding box, area between area - perimeter
        # and area
        r0, c0, r1, c1 = rp.bbox
        assert c0 <= x0 and x1 <= c1 and r0 <= y0 and y1 <= r1
        assert rp.area - rp.perimeter - 2 <= geom.area <= rp.area
        assert geom.contains(geom.representative_point())
        assert prop["objectType"] == "detection" and prop["classification"]["name"] == "Nucleus"
        assert prop["nucleus_id"] == rp.label
        assert set(prop["measurements"]) >= {"score", "area", "mean_hematoxylin"}


def test_geojson_scale_gives_level0_coordinates(tmp_path, tile):
    _, _, records = tile
    a = GeoJSONWriter(tmp_path / "a.geojson")
    a.add(records)
    b = GeoJSONWriter(tmp_path / "b.geojson", scale=4.0)
    b.add(records)
    ga, gb = load_geojson(a.close()), load_geojson(b.close())
    for (pa, _), (pb, _) in zip(ga, gb):
        assert pb.area == pytest.approx(16 * pa.area, rel=1e-3)
        assert pb.bounds[0] == pytest.approx(4 * pa.bounds[0], abs=0.05)


def test_polygon_of_tiny_and_thin_masks_is_valid():
    for m in (np.ones((1, 1), bool), np.ones((1, 5), bool), np.eye(4, dtype=bool)):
        p = mask_polygon(m, 10, 20)
        assert p.is_valid and p.area > 0
        assert p.bounds[0] >= 10 and p.bounds[1] >= 20


def test_coco_results_decode_to_the_masks(tmp_path, tile):
    _, label, records = tile
    w_ = CocoResultsWriter(tmp_path / "r.json", 7, label.shape)
    w_.add(records)
    items = json.loads(w_.close().read_text())
    assert len(items) == label.max()
    for it, rec in zip(items, records):
        m = mask_util.decode(it["segmentation"]).astype(bool)
        assert np.array_equal(m, label == rec.id)
        assert it["image_id"] == 7 and it["category_id"] == 1
        x, y, bw, bh = it["bbox"]
        assert (x, y, x + bw, y + bh) == rec.box


def test_csv_measurements_match_regionprops_and_hematoxylin(tmp_path, tile):
    image, label, records = tile
    w_ = CsvWriter(tmp_path / "m.csv")
    w_.add(records)
    with open(w_.close()) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == CSV_COLUMNS
    hema = hematoxylin_channel(image)
    for row, rp in zip(rows, regionprops(label, intensity_image=hema)):
        assert int(row["id"]) == rp.label
        assert float(row["area"]) == rp.area
        assert float(row["centroid_x"]) == pytest.approx(rp.centroid[1] + 0.5, abs=1e-3)
        assert float(row["centroid_y"]) == pytest.approx(rp.centroid[0] + 0.5, abs=1e-3)
        assert float(row["eccentricity"]) == pytest.approx(rp.eccentricity, abs=1e-3)
        assert float(row["mean_hematoxylin"]) == pytest.approx(rp.intensity_mean, abs=1e-3)
        assert float(row["solidity"]) == pytest.approx(rp.solidity, abs=0.1)
        assert float(row["perimeter"]) == pytest.approx(rp.perimeter, rel=0.05)
        assert row["area_um2"] == ""  # pixel size unknown


def test_micron_columns_when_pixel_size_known(tmp_path):
    label = np.zeros((20, 20), np.int32)
    label[2:6, 3:8] = 1
    recs = make_records(CropMasks.from_label_map(label), None, (0, 0), 1, scale=2.0, mpp=0.25)
    assert recs[0].measurements["area_um2"] == pytest.approx(20 * 0.5 * 0.5)
    assert recs[0].measurements["centroid_x"] == pytest.approx(2 * 5.5)


@pytest.mark.parametrize("memmap", [False, True])
def test_label_map_writer(tmp_path, tile, memmap):
    _, label, records = tile
    w_ = LabelMapWriter(tmp_path / "l.tif", label.shape, memmap_pixels=10 if memmap else 10**9)
    w_.add(records)
    path = w_.close()
    assert np.array_equal(read_label_map(path), label)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


@pytest.mark.parametrize("max_side", [4096, 60])
def test_overlay_writer(tmp_path, tile, max_side):
    image, label, records = tile
    w_ = OverlayWriter(tmp_path / "o.png", label.shape, max_side=max_side)
    w_.add_tile(image[:, :100], 0, 0)
    w_.add_tile(image[:, 90:], 0, 90)
    w_.add(records)
    out = np.array(Image.open(w_.close()))
    step = int(np.ceil(max(label.shape) / max_side))
    assert out.shape[:2] == (-(-label.shape[0] // step), -(-label.shape[1] // step))
    assert (out == (0, 200, 0)).all(axis=2).any() or (out == (0, 255, 0)).all(axis=2).any()


def test_abort_leaves_nothing(tmp_path, tile):
    _, _, records = tile
    w_ = GeoJSONWriter(tmp_path / "x.geojson")
    w_.add(records)
    w_.abort()
    assert list(tmp_path.iterdir()) == []


def test_abort_removes_the_temp_file_when_closing_it_fails(tmp_path):
    """A full disk fails the flush in ``close``; ``abort`` must still remove the hidden temporary file."""
    w_ = CsvWriter(tmp_path / "m.csv")
    w_.f.close()
    w_.f = open("/dev/full", "w")  # every flush fails with ENOSPC
    w_.f.write("x" * 10)
    w_.abort()
    assert list(tmp_path.iterdir()) == []
