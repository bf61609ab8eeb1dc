"""Converters: every format -> COCO (exact instances, organs, splits, empty images), the reverse, and bad input."""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import tifffile
from PIL import Image
from pycocotools.coco import COCO

from nuclei_d2.data.converters import (
    ConversionError,
    coco_to_label_maps,
    convert_dsb2018,
    convert_label_maps,
    convert_mat,
    convert_monuseg_xml,
    convert_pannuke,
    parse_aperio_xml,
    rasterize_polygons,
    select_split,
)
from nuclei_d2.structures import annotations_to_label_map, relabel_sequential
from nuclei_d2.utils.io import read_image_rgb, read_label_map

# ---- helpers -------------------------------------------------------------------------------------------------------


def aperio_xml(regions: list[list[tuple[float, float]]]) -> str:
    """An Aperio ImageScope XML document with one Region per vertex list (1-based coordinates)."""
    out = ['<Annotations MicronsPerPixel="0.25"><Annotation Id="1"><Regions>']
    for i, verts in enumerate(regions, 1):
        out.append(f'<Region Id="{i}" Type="0"><Attributes/><Vertices>')
        out += [f'<Vertex X="{x}" Y="{y}"/>' for x, y in verts]
        out.append("</Vertices></Region>")
    out.append("</Regions></Annotation></Annotations>")
    return "\n".join(out)


def square(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def write_rgb(path: Path, h: int, w: int, mode: str = "RGB", seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "RGB":
        arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    elif mode == "RGBA":
        arr = rng.integers(0, 255, (h, w, 4), dtype=np.uint8)
    elif mode == "L":
        arr = rng.integers(0, 255, (h, w), dtype=np.uint8)
    elif mode == "I;16":
        arr = rng.integers(0, 65535, (h, w), dtype=np.uint16)
    else:
        raise ValueError(mode)
    if path.suffix == ".tif":
        tifffile.imwrite(path, arr)
    else:
        Image.fromarray(arr).save(path)
    return path


def label_maps_of(coco: dict) -> dict[str, np.ndarray]:
    by_image = defaultdict(list)
    for a in coco["annotations"]:
        by_image[a["image_id"]].append(a)
    return {Path(im["file_name"]).stem: annotations_to_label_map(by_image[im["id"]], im["height"], im["width"])
            for im in coco["images"]}


def check_pycocotools(path: Path) -> COCO:
    coco = COCO(str(path))
    assert len(coco.getImgIds()) == len(json.loads(path.read_text())["images"])
    return coco


def sample_label(h: int = 40, w: int = 48) -> np.ndarray:
    """Four nuclei with non-consecutive labels, two of them touching."""
    lab = np.zeros((h, w), dtype=np.int32)
    lab[2:8, 3:10] = 7
    lab[2:8, 10:14] = 3  # touches 7
    lab[20:30, 20:25] = 12
    lab[35:39, 40:47] = 40
    return lab


# ---- MoNuSeg XML ---------------------------------------------------------------------------------------------------

def test_rasterize_square_pixel_rule():
    # 1-based vertices 2..5 -> 0-based 1..4; the half-open rule keeps centres 2, 3, 4 (bottom/right edges count).
    lab = rasterize_polygons([np.array(square(2, 2, 5, 5), dtype=float)], (8, 8))
    expected = np.zeros((8, 8), dtype=np.int32)
    expected[2:5, 2:5] = 1
    np.testing.assert_array_equal(lab, expected)


def test_rasterize_shared_edge_is_claimed_once():
    # Two squares sharing the edge x = 5 (1-based): every pixel centre belongs to exactly one of them.
    polys = [np.array(square(2, 2, 5, 5), float), np.array(square(5, 2, 8, 5), float)]
    first = rasterize_polygons(polys, (10, 10), overlap="first")
    last = rasterize_polygons(polys, (10, 10), overlap="last")
    np.testing.assert_array_equal(first, last)  # no pixel is contested
    assert (first == 1).sum() == 9 and (first == 2).sum() == 9


def test_rasterize_overlap_rule():
    polys = [np.array(square(1, 1, 7, 7), float), np.array(square(4, 4, 10, 10), float)]
    first = rasterize_polygons(polys, (12, 12), overlap="first")
    last = rasterize_polygons(polys, (12, 12), overlap="last")
    # pixel (5, 5) (0-based) lies in both
    assert first[5, 5] == 1 and last[5, 5] == 2
    assert (first == 1).sum() == 36 and (last == 2).sum() == 36


def test_degenerate_polygons_are_skipped_with_warning(caplog):
    polys = [("1", np.array(square(2, 2, 6, 6), float)),
             ("2", np.array([[3.0, 3.0], [4.0, 4.0]])),                        # 2 vertices
             ("3", np.array([[10.2, 10.2], [10.4, 10.2], [10.3, 10.3]])),       # covers no pixel centre
             ("4", np.array(square(3, 3, 5, 5), float))]                       # entirely under polygon 1
    with caplog.at_level(logging.WARNING, logger="nuclei_d2.data.converters"):
        lab = rasterize_polygons(polys, (16, 16), source="x.xml")
    assert sorted(np.unique(lab).tolist()) == [0, 1]
    text = caplog.text
    assert "fewer than 3 vertices (region id 2)" in text
    assert "cover no pixel centre" in text and "region id 3" in text
    assert "entirely under earlier polygons" in text and "region id 4" in text


def _xml_dataset(tmp_path: Path) -> tuple[Path, Path]:
    images, xmls = tmp_path / "images", tmp_path / "xml"
    xmls.mkdir(parents=True)
    write_rgb(images / "a.tif", 20, 24)
    write_rgb(images / "b.tif", 16, 16, seed=1)
    write_rgb(images / "c.tif", 16, 16, seed=2)  # no XML: left out with a warning
    (xmls / "a.xml").write_text(aperio_xml([square(2, 2, 6, 6), square(10, 10, 15, 13), [(1, 1), (2, 2)]]))
    (xmls / "b.xml").write_text(aperio_xml([]))  # no nuclei: the image is kept
    return images, xmls


def test_convert_monuseg_xml(tmp_path, caplog):
    images, xmls = _xml_dataset(tmp_path)
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"a": {"organ": "liver"}}))
    out = tmp_path / "out" / "x.json"
    with caplog.at_level(logging.WARNING, logger="nuclei_d2.data.converters"):
        coco = convert_monuseg_xml(images, xmls, out, metadata=meta, organ="unknown", show_progress=False)
    assert "1 image(s) have no XML" in caplog.text and "fewer than 3 vertices" in caplog.text
    assert json.loads(out.read_text()) == json.loads(json.dumps(coco))
    assert [im["file_name"] for im in coco["images"]] == [os.path.abspath(images / "a.tif"),
                                                          os.path.abspath(images / "b.tif")]
    a, b = coco["images"]
    assert (a["height"], a["width"], a["organ"], b["organ"]) == (20, 24, "liver", "unknown")
    assert coco["categories"] == [{"id": 1, "name": "nucleus", "supercategory": "nucleus"}]
    assert [an["image_id"] for an in coco["annotations"]] == [1, 1]
    assert all(an["iscrowd"] == 0 and an["category_id"] == 1 and isinstance(an["segmentation"]["counts"], str)
               for an in coco["annotations"])
    # Square 2..6 (1-based) -> centres 2..5 (0-based): 4x4 pixels, bbox x=2, y=2, w=h=4.
    assert coco["annotations"][0]["area"] == 16 and coco["annotations"][0]["bbox"] == [2.0, 2.0, 4.0, 4.0]
    # x 10..15, y 10..13 -> columns 10..14, rows 10..12
    assert coco["annotations"][1]["bbox"] == [10.0, 10.0, 5.0, 3.0]
    check_pycocotools(out)


def test_monuseg_xml_split_selection(tmp_path):
    images, xmls = _xml_dataset(tmp_path)
    split = tmp_path / "splits.json"
    split.write_text(json.dumps({"proto": {"train": ["b"], "test": ["a"]}, "_notes": ["comment"]}))
    coco = convert_monuseg_xml(images, xmls, split_file=split, splits=["proto/test"], show_progress=False)
    assert [Path(im["file_name"]).stem for im in coco["images"]] == ["a"]
    with pytest.raises(ConversionError, match="no split 'proto/val'.*proto/train, proto/test"):
        convert_monuseg_xml(images, xmls, split_file=split, splits=["proto/val"], show_progress=False)
    split.write_text(json.dumps({"s": ["a", "c"]}))
    with pytest.raises(ConversionError, match="have no XML annotation file: c"):
        convert_monuseg_xml(images, xmls, split_file=split, splits=["s"], show_progress=False)
    with pytest.raises(ConversionError, match="--split needs --split-file"):
        convert_monuseg_xml(images, xmls, splits=["s"], show_progress=False)


def test_select_split_union(tmp_path):
    split = tmp_path / "s.json"
    split.write_text(json.dumps({"k": {"x": ["1", "2"], "y": ["2", "3"]}}))
    assert select_split(split, ["k/x", "k/y"]) == ["1", "2", "3"]
    with pytest.raises(ConversionError, match="not a list of image stems"):
        select_split(split, ["k"])


@pytest.mark.parametrize("content, message", [
    ("", "empty"),
    ('<Annotations><Annotation><Regions><Region Id="1"><Vertices><Vertex X="1" Y="2"/>', "malformed XML at line 1"),
    ("<Foo/>", "not an Aperio ImageScope annotation file"),
    ('<Annotations><Region Id="9"><Vertex X="a" Y="1"/><Vertex X="1" Y="1"/><Vertex X="2" Y="2"/></Region>'
     "</Annotations>", "region 9 has a non-numeric"),
    ('<Annotations><Region Id="9"><Vertex X="1"/></Region></Annotations>', "without X and Y"),
])
def test_bad_xml_names_file(tmp_path, content, message):
    path = tmp_path / "bad.xml"
    path.write_text(content)
    with pytest.raises(ConversionError, match=message) as err:
        parse_aperio_xml(path)
    assert str(path) in str(err.value)


def test_failed_conversion_leaves_existing_json_untouched(tmp_path):
    images, xmls = _xml_dataset(tmp_path)
    out = tmp_path / "x.json"
    convert_monuseg_xml(images, xmls, out, show_progress=False)
    before = out.read_bytes()
    (xmls / "b.xml").write_text("<Annotations><Region>")  # now malformed
    with pytest.raises(ConversionError, match="b.xml: malformed XML"):
        convert_monuseg_xml(images, xmls, out, show_progress=False)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".x.")) == []  # no temp files left


def test_missing_image_for_annotation(tmp_path):
    images, xmls = _xml_dataset(tmp_path)
    (xmls / "zz.xml").write_text(aperio_xml([square(1, 1, 4, 4)]))
    with pytest.raises(ConversionError, match="no image for 1 XML annotation file.*zz.xml"):
        convert_monuseg_xml(images, xmls, show_progress=False)


# ---- label maps --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".png", ".tif", ".npy"])
def test_label_maps_round_trip_exact(tmp_path, suffix):
    lab = sample_label()
    images, labels = tmp_path / "im", tmp_path / "lab"
    labels.mkdir()
    write_rgb(images / "t1.png", *lab.shape)
    write_rgb(images / "t2.png", *lab.shape)
    if suffix == ".npy":
        np.save(labels / "t1.npy", lab)
        np.save(labels / "t2.npy", np.zeros_like(lab))
    elif suffix == ".tif":
        tifffile.imwrite(labels / "t1.tif", lab)
        tifffile.imwrite(labels / "t2.tif", np.zeros_like(lab))
    else:
        Image.fromarray(lab.astype(np.uint16)).save(labels / "t1.png")
        Image.fromarray(np.zeros(lab.shape, np.uint16)).save(labels / "t2.png")
    out = tmp_path / "c.json"
    coco = convert_label_maps(images, labels, out, show_progress=False)
    assert len(coco["images"]) == 2 and len(coco["annotations"]) == 4  # the empty t2 is kept, with no annotations
    maps = label_maps_of(json.loads(out.read_text()))
    np.testing.assert_array_equal(maps["t1"], relabel_sequential(lab))
    assert not maps["t2"].any()
    check_pycocotools(out)
    # and back to label maps on disk
    written = coco_to_label_maps(out, tmp_path / "back", fmt="png", show_progress=False)
    assert [p.name for p in written] == ["t1.png", "t2.png"]
    np.testing.assert_array_equal(read_label_map(written[0]), relabel_sequential(lab))


def test_image_kinds_rgba_grey_16bit(tmp_path):
    images, labels = tmp_path / "im", tmp_path / "lab"
    labels.mkdir()
    for stem, mode, suffix in [("rgba", "RGBA", ".png"), ("grey", "L", ".png"), ("deep", "I;16", ".png"),
                               ("tif16", "I;16", ".tif")]:
        write_rgb(images / f"{stem}{suffix}", 12, 10, mode=mode)
        Image.fromarray(np.pad(np.ones((2, 2), np.uint16), ((3, 7), (4, 4)))).save(labels / f"{stem}.png")
    coco = convert_label_maps(images, labels, verify_images=True, show_progress=False)
    assert [(im["height"], im["width"]) for im in coco["images"]] == [(12, 10)] * 4
    for im in coco["images"]:
        assert read_image_rgb(im["file_name"]).shape == (12, 10, 3)
    assert len(coco["annotations"]) == 4


def test_label_map_of_wrong_size_names_file(tmp_path):
    images, labels = tmp_path / "im", tmp_path / "lab"
    labels.mkdir()
    write_rgb(images / "a.png", 10, 10)
    Image.fromarray(np.zeros((10, 12), np.uint16)).save(labels / "a.png")
    with pytest.raises(ConversionError, match=r"lab/a.png: label map is 10x12 but its image is 10x10"):
        convert_label_maps(images, labels, show_progress=False)


def test_labels_suffix_same_folder_binary_and_organ(tmp_path):
    folder = tmp_path / "data"
    write_rgb(folder / "a.png", 10, 10)
    mask = np.zeros((10, 10), np.uint8)
    mask[1:3, 1:3] = 255
    mask[3:5, 3:5] = 255  # touches the first diagonally: 8-connectivity joins them
    mask[7:9, 1:9] = 255
    Image.fromarray(mask).save(folder / "a_mask.png")
    coco = convert_label_maps(folder, folder, label_suffix="_mask", binary=True, organ="breast",
                              show_progress=False)
    assert len(coco["images"]) == 1 and coco["images"][0]["organ"] == "breast"
    assert sorted(a["area"] for a in coco["annotations"]) == [8.0, 16.0]
    with pytest.raises(ConversionError, match="share a folder"):
        convert_label_maps(folder, folder, show_progress=False)


def test_image_root_relative_file_names(tmp_path):
    images, labels = tmp_path / "root" / "im", tmp_path / "lab"
    labels.mkdir()
    write_rgb(images / "a.png", 6, 6)
    np.save(labels / "a.npy", np.ones((6, 6), np.int32))
    coco = convert_label_maps(images, labels, image_root=tmp_path / "root", show_progress=False)
    assert coco["images"][0]["file_name"] == "im/a.png"
    assert coco["info"]["nuclei_d2"]["image_root"] == os.path.abspath(tmp_path / "root")
    with pytest.raises(ConversionError, match="not under --image-root"):
        convert_label_maps(images, labels, image_root=labels, show_progress=False)


# ---- DSB2018 -----------------------------------------------------------------------------------------------------

def _dsb(root: Path, image_id: str, h: int, w: int, masks: list[np.ndarray] | None, seed: int = 0) -> None:
    write_rgb(root / image_id / "images" / f"{image_id}.png", h, w, mode="RGBA", seed=seed)
    if masks is not None:
        (root / image_id / "masks").mkdir(parents=True)
        for k, m in enumerate(masks):
            Image.fromarray(m.astype(np.uint8) * 255).save(root / image_id / "masks" / f"m_{k}.png")


def test_convert_dsb2018(tmp_path, caplog):
    root = tmp_path / "stage1_train"
    masks = [np.zeros((8, 9), bool) for _ in range(12)]
    for k in range(12):
        masks[k][k % 8, k % 9] = True   # mask k: one pixel at (k % 8, k % 9)
    masks[1][0:3, 0:3] = True           # covers m_0's (0,0); m_2 (2,2), m_9 (1,0), m_10 (2,1) are painted later
    masks[10][2, 2] = True              # natural order paints m_10 after m_2 (not before, as plain sorting would)
    masks[5][:] = False                 # an empty mask
    _dsb(root, "img1", 8, 9, masks)
    _dsb(root, "img0", 5, 5, [], seed=1)  # a masks folder with no nucleus: kept
    with caplog.at_level(logging.WARNING, logger="nuclei_d2.data.converters"):
        coco = convert_dsb2018(root, tmp_path / "d.json", show_progress=False)
    assert "1 empty mask(s) skipped" in caplog.text
    assert [Path(im["file_name"]).stem for im in coco["images"]] == ["img0", "img1"]
    maps = label_maps_of(coco)
    assert not maps["img0"].any()
    lab = maps["img1"]
    # m_0 (under m_1), m_2 (under m_10) and m_5 (empty) vanish: 12 - 3 = 9 nuclei
    assert int(lab.max()) == 9
    assert lab[2, 2] == lab[2, 1] != lab[1, 1]   # (2,2) went to m_10
    assert lab[1, 0] != lab[1, 1]                # m_9 keeps its pixel inside m_1's block
    assert (lab > 0).sum() == 9 + 6              # m_1's block + m_3, m_4, m_6, m_7, m_8, m_11 outside it
    check_pycocotools(tmp_path / "d.json")


def test_dsb2018_bad_input(tmp_path):
    root = tmp_path / "s"
    _dsb(root, "x", 6, 6, None)
    with pytest.raises(ConversionError, match="x/masks: masks folder not found"):
        convert_dsb2018(root, show_progress=False)
    coco = convert_dsb2018(root, allow_unlabelled=True, show_progress=False)
    assert len(coco["images"]) == 1 and coco["annotations"] == []
    _dsb(root, "y", 6, 6, [np.ones((5, 6), bool)])
    with pytest.raises(ConversionError, match="m_0.png: mask is 5x6 but its image is 6x6"):
        convert_dsb2018(root, allow_unlabelled=True, show_progress=False)
    import shutil

    shutil.rmtree(root / "y")
    (root / "z").mkdir()
    with pytest.raises(ConversionError, match="z/images/z.png: image not found"):
        convert_dsb2018(root, allow_unlabelled=True, show_progress=False)


# ---- .mat (CPM17 / Kumar / HoVer-Net) -----------------------------------------------------------------------------

def test_convert_mat_inst_map_and_types(tmp_path):
    images, labels = tmp_path / "Images", tmp_path / "Labels"
    labels.mkdir()
    lab = sample_label()
    write_rgb(images / "a.png", *lab.shape)
    write_rgb(images / "b.png", *lab.shape)
    seq = relabel_sequential(lab)  # HoVer-Net inst_map: labels 1..N, inst_type[i] = type of label i + 1
    scipy.io.savemat(labels / "a.mat", {"inst_map": seq.astype(np.float64), "inst_type": np.array([[2], [1], [3],
                                                                                                  [0]])})
    # b: inst_uid gives the label each inst_type entry belongs to
    scipy.io.savemat(labels / "b.mat", {"inst_map": lab, "inst_uid": np.array([[40], [3], [7], [12]]),
                                        "inst_type": np.array([[1], [1], [2], [3]])})
    plain = convert_mat(images, labels, show_progress=False)
    assert plain["categories"][0]["name"] == "nucleus" and len(plain["annotations"]) == 8
    np.testing.assert_array_equal(label_maps_of(plain)["a"], seq)
    typed = convert_mat(images, labels, tmp_path / "t.json", type_key="inst_type", type_names=["x", "y", "z"],
                        show_progress=False)
    assert [c["name"] for c in typed["categories"]] == ["x", "y", "z"]
    a_cats = [an["category_id"] for an in typed["annotations"] if an["image_id"] == 1]
    assert a_cats == [2, 1, 3]  # the 4th instance has type 0 (no type) and is left out
    b_cats = [an["category_id"] for an in typed["annotations"] if an["image_id"] == 2]
    assert b_cats == [1, 2, 3, 1]  # labels 3, 7, 12, 40 in increasing order
    check_pycocotools(tmp_path / "t.json")
    with pytest.raises(ConversionError, match=r"type id\(s\) \[3\] outside 1..2"):
        convert_mat(images, labels, type_key="inst_type", type_names=["x", "y"], show_progress=False)


def test_mat_key_detection_errors(tmp_path):
    images, labels = tmp_path / "Images", tmp_path / "Labels"
    labels.mkdir()
    write_rgb(images / "a.png", 6, 6)
    scipy.io.savemat(labels / "a.mat", {"foo": np.ones((6, 6)), "bar": np.zeros((6, 6))})
    with pytest.raises(ConversionError, match="a.mat: cannot tell which variable.*--mat-key"):
        convert_mat(images, labels, show_progress=False)
    assert len(convert_mat(images, labels, key="foo", show_progress=False)["annotations"]) == 1
    with pytest.raises(ConversionError, match="no variable 'baz'.*foo, bar|no variable 'baz'.*bar, foo"):
        convert_mat(images, labels, key="baz", show_progress=False)
    scipy.io.savemat(labels / "a.mat", {"only": np.ones((5, 6))})  # CPM-style single array, wrong size
    with pytest.raises(ConversionError, match="instance map is 5x6 but its image is 6x6"):
        convert_mat(images, labels, show_progress=False)
    (labels / "a.mat").write_bytes(b"")
    with pytest.raises(ConversionError, match="a.mat: the .mat file is empty"):
        convert_mat(images, labels, show_progress=False)


# ---- PanNuke -----------------------------------------------------------------------------------------------------

def _pannuke(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (3, 16, 16, 3))
    masks = np.zeros((3, 16, 16, 6))
    masks[0, 1:4, 1:4, 0] = 5      # neoplastic, id 5
    masks[0, 6:9, 6:9, 0] = 9      # neoplastic, id 9
    masks[0, 10:14, 1:4, 4] = 2    # epithelial
    masks[1, 2:5, 2:5, 1] = 1      # inflammatory
    masks[:, :, :, 5] = (masks[:, :, :, :5].sum(axis=3) == 0)
    np.save(folder / "images.npy", images)
    np.save(folder / "masks.npy", masks)
    np.save(folder / "types.npy", np.array(["Breast", "Colon", "Adrenal_gland"]))
    return folder / "images.npy", folder / "masks.npy"


def test_convert_pannuke(tmp_path):
    images, masks = _pannuke(tmp_path / "fold1")
    out = tmp_path / "out" / "pn.json"
    coco = convert_pannuke(images, masks, out, keep_types=True, show_progress=False)
    assert [c["name"] for c in coco["categories"]] == ["neoplastic", "inflammatory", "connective", "dead",
                                                       "epithelial"]
    assert [im["file_name"] for im in coco["images"]] == [f"pn_images/{i:05d}.png" for i in range(3)]
    assert [im["organ"] for im in coco["images"]] == ["breast", "colon", "adrenal_gland"]
    assert [(a["image_id"], a["category_id"]) for a in coco["annotations"]] == [(1, 1), (1, 1), (1, 5), (2, 2)]
    png = np.array(Image.open(out.parent / "pn_images" / "00000.png"))
    np.testing.assert_array_equal(png, np.clip(np.rint(np.load(images)[0]), 0, 255).astype(np.uint8))
    check_pycocotools(out)
    plain = convert_pannuke(images, masks, tmp_path / "out" / "pn1.json", show_progress=False)
    assert len(plain["categories"]) == 1 and {a["category_id"] for a in plain["annotations"]} == {1}
    np.save(tmp_path / "fold1" / "bad.npy", np.zeros((3, 16, 16, 5)))
    with pytest.raises(ConversionError, match="bad.npy: expected N x H x W x 6 masks"):
        convert_pannuke(images, tmp_path / "fold1" / "bad.npy", out, show_progress=False)


# ---- COCO -> label maps ------------------------------------------------------------------------------------------

def test_to_labels_overlap_types_and_formats(tmp_path, caplog):
    from nuclei_d2.structures import mask_crop_to_rle

    def rle(r0, r1, c0, c1):
        m = np.zeros((6, 6), bool)
        m[r0:r1, c0:c1] = True
        return {"segmentation": mask_crop_to_rle(m, 0, 0, 6, 6), "area": float(m.sum()), "bbox": [c0, r0, 1, 1]}

    coco = {"images": [{"id": 5, "file_name": "/x/tile.png", "height": 6, "width": 6}],
            "annotations": [{"id": 1, "image_id": 5, "category_id": 2, "iscrowd": 0, **rle(0, 3, 0, 3)},
                            {"id": 2, "image_id": 5, "category_id": 1, "iscrowd": 0, **rle(2, 4, 2, 4)},
                            {"id": 3, "image_id": 5, "category_id": 1, "iscrowd": 1, **rle(5, 6, 5, 6)}],
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(coco))
    with caplog.at_level(logging.WARNING, logger="nuclei_d2.data.converters"):
        [written] = coco_to_label_maps(path, tmp_path / "lab", fmt="tif", type_dir=tmp_path / "types",
                                       show_progress=False)
    assert "overlap on about 1 pixel" in caplog.text and "1 crowd annotation" in caplog.text
    lab = read_label_map(written)
    assert written.name == "tile.tif" and lab[2, 2] == 2 and lab[0, 0] == 1 and lab[5, 5] == 0
    types = read_label_map(tmp_path / "types" / "tile.tif")
    assert types[0, 0] == 2 and types[3, 3] == 1 and types[5, 5] == 0


# ---- real data ---------------------------------------------------------------------------------------------------

@pytest.mark.real_data
def test_monuseg_xml_agrees_with_label_maps(shared_data, tmp_path):
    """The 13 XMLs rasterized our way match the released label maps: IoU >= 0.98 and equal instance counts."""
    train = shared_data / "monuseg2018" / "train"
    start = time.perf_counter()
    xml = convert_monuseg_xml(train / "images", train / "annotations_xml", tmp_path / "xml.json",
                              show_progress=False)
    elapsed = time.perf_counter() - start
    assert len(xml["images"]) == 13
    maps = label_maps_of(xml)
    for stem, got in maps.items():
        ref = read_label_map(train / "labels" / f"{stem}.png")
        inter = np.logical_and(got > 0, ref > 0).sum()
        iou = inter / np.logical_or(got > 0, ref > 0).sum()
        assert iou >= 0.98, f"{stem}: foreground IoU {iou:.4f}"
        assert int(got.max()) == len(np.unique(ref)) - 1, stem
        # instances too: same numbering (region order) and overlaps resolved as in the released maps
        same = (got == relabel_sequential(ref)).mean()
        assert same >= 0.99, f"{stem}: only {same:.4f} of pixels carry the same instance"
    check_pycocotools(tmp_path / "xml.json")
    print(f"13 MoNuSeg XMLs converted in {elapsed:.1f} s")


@pytest.mark.real_data
def test_monuseg_label_maps_30_tiles(shared_data, tmp_path):
    root = shared_data / "monuseg2018"
    start = time.perf_counter()
    coco = convert_label_maps(root / "train" / "images", root / "train" / "labels", tmp_path / "all.json",
                              show_progress=False)
    elapsed = time.perf_counter() - start
    meta = json.loads((root / "metadata.json").read_text())
    assert len(coco["images"]) == 30 and len(coco["annotations"]) == 16958
    assert {Path(im["file_name"]).stem: im["organ"] for im in coco["images"]} == \
        {k: v["organ"] for k, v in meta.items()}
    for stem, got in label_maps_of(coco).items():
        np.testing.assert_array_equal(got, relabel_sequential(read_label_map(root / "train" / "labels" /
                                                                             f"{stem}.png")), err_msg=stem)
    check_pycocotools(tmp_path / "all.json")
    kumar = convert_label_maps(root / "train" / "images", root / "train" / "labels", split_file=root / "splits.json",
                               splits=["kumar2017/test_diff_organ"], show_progress=False)
    assert sorted({im["organ"] for im in kumar["images"]}) == ["bladder", "colon", "stomach"]
    print(f"30 MoNuSeg tiles (label maps) converted in {elapsed:.1f} s")


@pytest.mark.real_data
def test_dsb2018_real(shared_data, tmp_path):
    root = shared_data / "dsb2018_brightfield"
    meta = json.loads((root / "metadata.json").read_text())
    coco = convert_dsb2018(root / "stage1_test", tmp_path / "t.json", show_progress=False)
    counts = defaultdict(int)
    for a in coco["annotations"]:
        counts[a["image_id"]] += 1
    got = {Path(im["file_name"]).stem: counts[im["id"]] for im in coco["images"]}
    assert got == {k: v["n_nuclei_label"] for k, v in meta["stage1_test"].items()}
    for stem, lab in label_maps_of(coco).items():
        ref = read_label_map(root / "labels" / "stage1_test" / f"{stem}.png")
        np.testing.assert_array_equal(lab, relabel_sequential(ref), err_msg=stem)
    check_pycocotools(tmp_path / "t.json")


def test_outputs_are_world_readable(tmp_path):
    images, xmls = _xml_dataset(tmp_path)
    out = tmp_path / "x.json"
    convert_monuseg_xml(images, xmls, out, show_progress=False)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


# ---- issue 22: to-labels validates the whole file and writes all or nothing ---------------------------------------

def _rle_anno(anno_id: int, image_id, h: int = 6, w: int = 6, box=(0, 2, 0, 2)) -> dict:
    from nuclei_d2.structures import mask_crop_to_rle

    m = np.zeros((h, w), bool)
    r0, r1, c0, c1 = box
    m[r0:r1, c0:c1] = True
    return {"id": anno_id, "image_id": image_id, "category_id": 1, "iscrowd": 0, "area": float(m.sum()),
            "bbox": [c0, r0, c1 - c0, r1 - r0], "segmentation": mask_crop_to_rle(m, 0, 0, h, w)}


def _three_images(tmp_path: Path, annotations: list, images: list | None = None) -> Path:
    images = images or [{"id": i, "file_name": f"/x/t{i}.png", "height": 6, "width": 6} for i in (1, 2, 3)]
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1}]}))
    return path


@pytest.mark.parametrize("case, message", [
    ("unknown", "c.json: annotation 3 (#3 of 'annotations'): image_id 7 is not the id of any image"),
    ("no_image_id", "c.json: annotation 2 (#2 of 'annotations'): no image_id"),
    ("duplicate", "c.json: image 2 (#4 of 'images'): id 2 is also the id of image #2; image ids must be unique"),
    ("bad_rle", "c.json: annotation 3 (#3 of 'annotations') of image 3: RLE counts do not decode"),
    ("short_rle", "c.json: annotation 3 (#3 of 'annotations') of image 3: RLE covers 7 pixels, not the image's 6x6"),
    ("wrong_size", "c.json: annotation 3 (#3 of 'annotations') of image 3: RLE size 5x6 differs"),
])
def test_to_labels_validates_whole_file_first(tmp_path, case, message):
    """Unknown or missing image ids, duplicate image ids and an RLE that does not decode to the image's size are
    refused, naming the file and the first offender, and not one label map is written (the old code dropped,
    duplicated, raised KeyError, or left the maps of the images before the bad one)."""
    annos = [_rle_anno(1, 1), _rle_anno(2, 2), _rle_anno(3, 3)]
    images = None
    if case == "unknown":
        annos[2]["image_id"] = 7
    elif case == "no_image_id":
        del annos[1]["image_id"]
    elif case == "duplicate":
        images = [{"id": i, "file_name": f"/x/t{k}.png", "height": 6, "width": 6} for k, i in enumerate((1, 2, 3, 2))]
    elif case == "bad_rle":
        annos[2]["segmentation"]["counts"] = annos[2]["segmentation"]["counts"][:-1]
    elif case == "short_rle":
        annos[2]["segmentation"]["counts"] = [3, 4]
    elif case == "wrong_size":
        annos[2]["segmentation"]["size"] = [5, 6]
    annos.append({**_rle_anno(4, 9), "id": 4})  # a second problem: counted, not listed
    path = _three_images(tmp_path, annos, images)
    out = tmp_path / "labels"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(ConversionError) as err:
        coco_to_label_maps(path, out, show_progress=False)
    assert str(err.value).startswith(f"{path}: ") and message.split("c.json: ")[1] in str(err.value)
    assert str(err.value).endswith("(and 1 more problem(s) in the file)") and "\n" not in str(err.value)
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]  # nothing written, nothing deleted, no temp left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "labels"]


def test_to_labels_failure_while_writing_leaves_nothing(tmp_path):
    """A failure after painting began (a PNG cannot hold 70,000 nuclei) removes every map already written."""
    h, w = 300, 300
    big = np.arange(1, h * w + 1, dtype=np.int32).reshape(h, w)  # 90,000 one-pixel nuclei
    from nuclei_d2.structures import label_map_to_annotations

    annos = [{**a, "id": k + 10, "image_id": 3} for k, a in enumerate(label_map_to_annotations(big))]
    for a in annos:
        a.pop("bbox_mode")
    images = [{"id": 1, "file_name": "a.png", "height": 6, "width": 6},
              {"id": 2, "file_name": "b.png", "height": 6, "width": 6},
              {"id": 3, "file_name": "c.png", "height": h, "width": w}]
    path = _three_images(tmp_path, [_rle_anno(1, 1), _rle_anno(2, 2)] + annos, images)
    with pytest.raises(ConversionError, match="c.json: image 3: .*65,535|c.json: image 3: .*16-bit"):
        coco_to_label_maps(path, tmp_path / "new" / "labels", fmt="png", show_progress=False)
    assert not (tmp_path / "new").exists()  # the folders it would have created are gone too
    written = coco_to_label_maps(path, tmp_path / "new" / "labels", fmt="npy", show_progress=False)
    assert [p.name for p in written] == ["a.npy", "b.npy", "c.npy"]
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["labels"]


def test_to_labels_into_existing_folder_keeps_other_files(tmp_path):
    path = _three_images(tmp_path, [_rle_anno(1, 1), _rle_anno(2, 2, box=(1, 3, 1, 4))])
    out = tmp_path / "labels"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    (out / "t1.png").write_text("stale")
    written = coco_to_label_maps(path, out, type_dir=out / "types", show_progress=False)
    assert [p.name for p in written] == ["t1.png", "t2.png", "t3.png"]
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt", "t1.png", "t2.png", "t3.png", "types"]
    assert read_label_map(out / "t2.png").sum() == 6 and read_label_map(out / "types" / "t2.png").sum() == 6
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "types").stat().st_mode & 0o777 == 0o777 & ~umask


# ---- issue 22: truncated TIFFs are refused by default --------------------------------------------------------------

def _cut(src: Path, dst: Path, keep: int) -> Path:
    """``src`` cut to its first ``keep`` bytes (negative: without its last ``-keep`` bytes)."""
    dst.write_bytes(src.read_bytes()[:keep])
    return dst


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_truncated_tiff_refused_without_verify_images(tmp_path, compression):
    """A TIFF cut short whose header is intact (tifffile puts the page directory first) was accepted with exit 0;
    now the strips' offsets + byte counts are checked against the file size."""
    images, labels = tmp_path / "im", tmp_path / "lab"
    labels.mkdir()
    whole = tmp_path / "whole.tif"
    arr = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    tifffile.imwrite(whole, arr, compression=compression, rowsperstrip=8)
    images.mkdir()
    _cut(whole, images / "a.tif", -100)
    tifffile.imwrite(images / "b.tif", arr)
    for stem in ("a", "b"):
        Image.fromarray(sample_label(64, 80).astype(np.uint16)).save(labels / f"{stem}.png")
    with pytest.raises(ConversionError, match=r"a\.tif: truncated TIFF: page 0 needs [\d,]+ bytes but the file has"):
        convert_label_maps(images, labels, tmp_path / "o.json", show_progress=False)
    assert not (tmp_path / "o.json").exists()
    with pytest.raises(ConversionError, match=r"a\.tif: cannot read image"):
        convert_label_maps(images, labels, verify_images=True, show_progress=False)
    (images / "a.tif").write_bytes(whole.read_bytes())  # the whole file passes
    assert len(convert_label_maps(images, labels, show_progress=False)["images"]) == 2


def test_truncated_tiled_and_multipage_tiff(tmp_path):
    from nuclei_d2.data.converters.common import check_image_file

    arr = np.zeros((64, 64, 3), np.uint8)
    tifffile.imwrite(tmp_path / "tiled.tif", arr, tile=(16, 16))
    check_image_file(tmp_path / "tiled.tif")
    with pytest.raises(ConversionError, match="truncated TIFF: page 0"):
        check_image_file(_cut(tmp_path / "tiled.tif", tmp_path / "tiled_cut.tif", -5))
    with tifffile.TiffWriter(tmp_path / "pages.tif") as tw:
        tw.write(arr)
        tw.write(arr[:32, :32])
    data = (tmp_path / "pages.tif").read_bytes()
    with tifffile.TiffFile(tmp_path / "pages.tif") as tf:
        # the second page's pixels are the file's last bytes: cutting them leaves page 0 (and both headers) whole
        assert int(tf.pages[1].dataoffsets[0]) + int(tf.pages[1].databytecounts[0]) == len(data)
    (tmp_path / "pages_cut.tif").write_bytes(data[:-10])
    with pytest.raises(ConversionError, match="truncated TIFF: page 1"):
        check_image_file(tmp_path / "pages_cut.tif")
    (tmp_path / "x.png").write_bytes(b"not checked here")
    check_image_file(tmp_path / "x.png")


@pytest.mark.real_data
def test_truncated_real_tile_one_line_error(shared_data, tmp_path, caplog):
    """A cut MoNuSeg tile (page directory at the end, so nothing is readable): one error naming it, no tifffile
    log line about "invalid offset" besides it."""
    from nuclei_d2.data.converters.common import check_image_file

    tiles = sorted((shared_data / "monuseg2018" / "train" / "images").glob("*.tif"))
    for tile in tiles:
        check_image_file(tile)  # every real tile passes
    cut = _cut(tiles[0], tmp_path / "cut.tif", tiles[0].stat().st_size // 2)
    with caplog.at_level(logging.WARNING):
        with pytest.raises(ConversionError, match=r"cut\.tif: truncated or damaged TIFF: no readable image page"):
            check_image_file(cut)
    assert "invalid offset" not in caplog.text


# ---- issue 22: polygons that run off the image are counted -----------------------------------------------------------

def test_polygons_off_the_image_are_counted(tmp_path, caplog):
    polys = [("1", np.array(square(2, 2, 6, 6), float)),
             ("2", np.array(square(12, 3, 20, 8), float)),     # runs off the right edge of a 16-wide image
             ("3", np.array(square(-3, -3, 3, 3), float)),     # off the top-left corner
             ("4", np.array(square(30, 30, 34, 34), float))]   # entirely outside: skipped, not "clipped"
    stats: dict = {}
    with caplog.at_level(logging.WARNING, logger="nuclei_d2.data.converters"):
        lab = rasterize_polygons(polys, (12, 16), source="x.xml", stats=stats)
    assert "x.xml: 2 polygon(s) run off the 12x16 image and are clipped to it (region id 2, 3)" in caplog.text
    assert stats == {"clipped": 2, "skipped": 1, "dropped": 0}
    assert (lab == 2).sum() == 5 * 4  # columns 11..15, rows 3..6 (0-based)
    images, xmls = tmp_path / "im", tmp_path / "xml"
    write_rgb(images / "a.tif", 12, 16)
    write_rgb(images / "b.tif", 12, 16)
    xmls.mkdir()
    (xmls / "a.xml").write_text(aperio_xml([square(2, 2, 6, 6), square(12, 3, 20, 8), square(-3, -3, 3, 3)]))
    (xmls / "b.xml").write_text(aperio_xml([square(2, 2, 6, 6)]))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nuclei_d2.data.converters"):
        coco = convert_monuseg_xml(images, xmls, show_progress=False)
    assert f"{xmls}: 2 polygon(s) in 1 of 2 XML file(s) ran off their image and were clipped to it (a.xml: 2)" \
        in caplog.text
    assert coco["info"]["nuclei_d2"]["clipped_polygons"] == 2


# ---- issue 22: rasterization choice ---------------------------------------------------------------------------

def test_fill_poly_is_a_larger_superset_of_centers():
    rng = np.random.default_rng(3)
    polys = [np.array(square(2, 2, 5, 5), float), np.array([[10.3, 2.2], [17.8, 6.1], [11.1, 9.7]]),
             np.array(square(5, 2, 8, 5), float)]  # shares an edge with the first
    for _ in range(20):  # random star-shaped nuclei, fractional vertices as ImageScope writes them
        c = rng.uniform(5, 35, 2)
        t = np.sort(rng.uniform(0, 2 * np.pi, 9))
        r = rng.uniform(2, 5, 9)
        polys.append(np.stack([c[0] + r * np.cos(t), c[1] + r * np.sin(t)], axis=1))
    for overlap in ("first", "last"):
        cen = rasterize_polygons(polys, (40, 40), overlap=overlap)
        fill = rasterize_polygons(polys, (40, 40), overlap=overlap, method="fill-poly")
        assert not np.any((cen > 0) & (fill == 0))  # every centre pixel is filled
        assert (fill > 0).sum() > 1.1 * (cen > 0).sum()
    # a square of 1-based corners 2..5: centres 2, 3, 4 (0-based); fillPoly also takes the edge pixels 1..4
    fill = rasterize_polygons([polys[0]], (8, 8), method="fill-poly")
    expected = np.zeros((8, 8), np.int32)
    expected[1:5, 1:5] = 1
    np.testing.assert_array_equal(fill, expected)
    with pytest.raises(ValueError, match="method must be one of centers, fill-poly"):
        rasterize_polygons([polys[0]], (8, 8), method="fillpoly")


@pytest.mark.real_data
def test_fill_poly_on_real_xmls(shared_data, tmp_path):
    """The measurement behind docs/data.md: edge-inclusive filling adds 5-13% foreground per tile."""
    train = shared_data / "monuseg2018" / "train"
    stems = ["TCGA-21-5784-01Z-00-DX1", "TCGA-50-5931-01Z-00-DX1"]  # the largest and smallest increase seen
    cen = label_maps_of(convert_monuseg_xml(train / "images", train / "annotations_xml", stems=stems,
                                            show_progress=False))
    coco = convert_monuseg_xml(train / "images", train / "annotations_xml", tmp_path / "f.json", stems=stems,
                               rasterize="fill-poly", show_progress=False)
    assert coco["info"]["nuclei_d2"]["rasterize"] == "fill-poly"
    fill = label_maps_of(coco)
    for stem in stems:
        ref = read_label_map(train / "labels" / f"{stem}.png") > 0
        c, f = cen[stem] > 0, fill[stem] > 0
        assert not np.any(c & ~f), stem
        assert 1.05 < f.sum() / c.sum() < 1.13, stem
        assert (f & ref).sum() / (f | ref).sum() < 0.95 < (c & ref).sum() / (c | ref).sum()
        assert int(fill[stem].max()) == int(cen[stem].max())  # same nuclei


# ---- issue 22: the output location is checked before any work -------------------------------------------------------

def test_output_location_checked_first(tmp_path):
    images, xmls = _xml_dataset(tmp_path)
    (xmls / "b.xml").write_text("<Annotations><Region>")  # bad input: the output error must come first
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    cases = [
        (blocker / "sub" / "x.json", f"{blocker / 'sub' / 'x.json'}: cannot create the output: {blocker} is a file"),
        (tmp_path, f"{tmp_path}: the output is an existing folder"),
        (tmp_path / "x.txt", f"{tmp_path / 'x.txt'}: the output must be a .json file"),
        (Path("/proc/nuclei_d2_test/x.json"), "/proc/nuclei_d2_test/x.json: cannot write the output there (in /proc)"),
    ]
    for out, message in cases:
        with pytest.raises(ConversionError) as err:
            convert_monuseg_xml(images, xmls, out, show_progress=False)
        assert str(err.value).startswith(message), str(err.value)
        with pytest.raises(ConversionError, match="cannot create the output|existing folder|.json file|cannot write"):
            convert_label_maps(images, tmp_path / "none", out, show_progress=False)
    for out_dir, message in [(blocker, f"{blocker}: the label map folder is an existing file"),
                             (blocker / "labels", f"{blocker / 'labels'}: cannot create the label map folder: "
                                                  f"{blocker} is a file"),
                             (Path("/sys/nuclei_d2_test"), "/sys/nuclei_d2_test: cannot write the label map folder")]:
        with pytest.raises(ConversionError) as err:
            coco_to_label_maps(tmp_path / "missing.json", out_dir, show_progress=False)
        assert str(err.value).startswith(message), str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "images", "xml"]  # no probe left behind


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores permission bits")
def test_output_folder_without_write_permission(tmp_path):
    images, xmls = _xml_dataset(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ConversionError, match=f"{locked / 'x.json'}: cannot write the output there"):
            convert_monuseg_xml(images, xmls, locked / "x.json", show_progress=False)
    finally:
        locked.chmod(0o700)
