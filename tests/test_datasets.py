"""Dataset registration: lazy Detectron2 catalogs, dict format, idempotence, config-driven and built-in datasets."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import annotations_to_instances
from detectron2.structures import BoxMode
from PIL import Image

from nuclei_d2.config import add_nuclei_config
from nuclei_d2.data.converters import convert_label_maps, convert_pannuke
from nuclei_d2.data.datasets import (
    BUILTIN_DATASETS,
    KUMAR_TRAIN_ORGANS,
    DatasetLoadError,
    builtin_json_path,
    get_image_organs,
    register_all_builtin,
    register_datasets_from_config,
    register_nuclei_dataset,
    unregister_nuclei_dataset,
)
from nuclei_d2.structures import label_map_to_instances, relabel_sequential


@pytest.fixture
def name():
    """A fresh dataset name, unregistered afterwards."""
    n = f"test_nuclei_{uuid.uuid4().hex[:8]}"
    yield n
    unregister_nuclei_dataset(n)


def _labels() -> dict[str, np.ndarray]:
    a = np.zeros((24, 30), np.int32)
    a[2:6, 3:9] = 5
    a[10:18, 10:14] = 2
    a[19:23, 25:29] = 9
    b = np.zeros((24, 30), np.int32)  # no nuclei
    c = np.zeros((24, 30), np.int32)
    c[0:4, 0:4] = 1
    return {"a": a, "b": b, "c": c}


@pytest.fixture
def converted(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    labels = _labels()
    (tmp_path / "im").mkdir()
    (tmp_path / "lab").mkdir()
    for stem, lab in labels.items():
        Image.fromarray(np.full(lab.shape + (3,), 200, np.uint8)).save(tmp_path / "im" / f"{stem}.png")
        Image.fromarray(lab.astype(np.uint16)).save(tmp_path / "lab" / f"{stem}.png")
    meta = tmp_path / "metadata.json"
    meta.write_text(json.dumps({"a": {"organ": "breast"}, "b": {"organ": "colon"}, "c": {"organ": "breast"}}))
    out = tmp_path / "out" / "d.json"
    convert_label_maps(tmp_path / "im", tmp_path / "lab", out, metadata=meta, show_progress=False)
    return out, labels


def test_registration_is_lazy_and_missing_json_is_explained(name, tmp_path):
    missing = tmp_path / "nope" / "x.json"
    register_nuclei_dataset(name, missing, missing_hint="Run `make-it`.")
    assert name in DatasetCatalog.list()
    meta = MetadataCatalog.get(name)
    assert meta.evaluator_type == "nuclei" and meta.json_file == str(missing)
    with pytest.raises(DatasetLoadError, match=rf"{name}.*{missing} not found\. Run `make-it`\."):
        DatasetCatalog.get(name)
    with pytest.raises(DatasetLoadError, match="not found"):
        meta.thing_classes  # noqa: B018  (read lazily from the JSON)


def test_dataset_dicts(name, converted):
    json_file, labels = converted
    register_nuclei_dataset(name, json_file, train_organs=["breast"])
    dicts = DatasetCatalog.get(name)
    coco = json.loads(json_file.read_text())
    assert [d["image_id"] for d in dicts] == [im["id"] for im in coco["images"]]
    assert [d["organ"] for d in dicts] == ["breast", "colon", "breast"]
    for d, stem in zip(dicts, ["a", "b", "c"]):
        assert Path(d["file_name"]).is_absolute() and Path(d["file_name"]).is_file()
        assert (d["height"], d["width"]) == (24, 30)
        seq = relabel_sequential(labels[stem])
        assert len(d["annotations"]) == seq.max()
        for k, anno in enumerate(d["annotations"], start=1):
            assert anno["bbox_mode"] == BoxMode.XYWH_ABS and anno["category_id"] == 0 and anno["iscrowd"] == 0
            np.testing.assert_array_equal(mask_util.decode(anno["segmentation"]).astype(bool), seq == k)
            x, y, w, h = anno["bbox"]
            rows, cols = np.nonzero(seq == k)
            assert (x, y, w, h) == (cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1)
    assert dicts[1]["annotations"] == []  # the empty image is kept
    # Detectron2 turns them into training targets with bitmask masks
    inst = annotations_to_instances(dicts[0]["annotations"], (24, 30), mask_format="bitmask")
    assert inst.gt_masks.tensor.shape == (3, 24, 30) and inst.gt_classes.tolist() == [0, 0, 0]
    meta = MetadataCatalog.get(name)
    assert meta.thing_classes == ["nucleus"] and meta.thing_dataset_id_to_contiguous_id == {1: 0}
    assert meta.train_organs == ["breast"] and meta.json_file == str(json_file)
    assert meta.as_dict()["thing_classes"] == ["nucleus"]
    assert get_image_organs(name) == {1: "breast", 2: "colon", 3: "breast"}


def test_organ_filter(name, converted):
    json_file, _ = converted
    register_nuclei_dataset(name, json_file, organs=["Breast"])
    assert [d["organ"] for d in DatasetCatalog.get(name)] == ["breast", "breast"]


def test_same_registration_twice_is_fine_a_different_one_fails(name, converted, tmp_path):
    json_file, _ = converted
    register_nuclei_dataset(name, json_file)
    register_nuclei_dataset(name, str(json_file))  # same definition: no-op
    with pytest.raises(ValueError, match=rf"dataset '{name}' is already registered.*overwrite=True"):
        register_nuclei_dataset(name, tmp_path / "other.json")
    register_nuclei_dataset(name, tmp_path / "other.json", overwrite=True)
    assert MetadataCatalog.get(name).json_file == str(tmp_path / "other.json")
    DatasetCatalog.remove(name)  # removed behind our back: registering again must work, not be skipped
    register_nuclei_dataset(name, tmp_path / "other.json")
    assert name in DatasetCatalog.list()
    DatasetCatalog.register(name + "_foreign", lambda: [])
    try:
        with pytest.raises(ValueError, match="registered outside nuclei_d2"):
            register_nuclei_dataset(name + "_foreign", json_file)
    finally:
        DatasetCatalog.remove(name + "_foreign")


def test_class_names_are_read_lazily_from_the_json(name, tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "f").mkdir()
    masks = np.zeros((2, 8, 8, 6))
    masks[0, 1:3, 1:3, 2] = 4
    masks[1, 4:6, 4:6, 0] = 1
    np.save(tmp_path / "f" / "images.npy", rng.uniform(0, 255, (2, 8, 8, 3)))
    np.save(tmp_path / "f" / "masks.npy", masks)
    out = tmp_path / "pn.json"
    convert_pannuke(tmp_path / "f" / "images.npy", tmp_path / "f" / "masks.npy", out, keep_types=True,
                    show_progress=False)
    register_nuclei_dataset(name, out)
    meta = MetadataCatalog.get(name)
    assert meta.thing_classes == ["neoplastic", "inflammatory", "connective", "dead", "epithelial"]
    dicts = DatasetCatalog.get(name)
    assert [a["category_id"] for d in dicts for a in d["annotations"]] == [2, 0]
    assert Path(dicts[0]["file_name"]) == tmp_path / "pn_images" / "00000.png"  # relative to the JSON's folder
    other = name + "_x"
    register_nuclei_dataset(other, out, thing_classes=["nucleus"])
    try:
        with pytest.raises(DatasetLoadError, match="has categories .*neoplastic.* registered with thing_classes"):
            DatasetCatalog.get(other)
    finally:
        unregister_nuclei_dataset(other)


def test_relative_file_names_and_missing_images(name, converted, tmp_path):
    json_file, _ = converted
    coco = json.loads(json_file.read_text())
    for im in coco["images"]:
        im["file_name"] = Path(im["file_name"]).name
    rel = tmp_path / "rel.json"
    rel.write_text(json.dumps(coco))
    register_nuclei_dataset(name, rel, image_root=tmp_path / "im")
    assert [Path(d["file_name"]) for d in DatasetCatalog.get(name)] == [tmp_path / "im" / f"{s}.png" for s in "abc"]
    register_nuclei_dataset(name, rel, overwrite=True)  # default root: the JSON's folder, where they are not
    with pytest.raises(DatasetLoadError, match=rf"3 image file\(s\) listed in {rel} are missing, e.g. .*a.png"):
        DatasetCatalog.get(name)


def test_evaluates_with_detectron2_coco_evaluator(name, converted):
    """json_file metadata lets Detectron2's COCOEvaluator score predictions: perfect masks give AP 100."""
    from detectron2.evaluation import COCOEvaluator

    json_file, labels = converted
    register_nuclei_dataset(name, json_file)
    evaluator = COCOEvaluator(name, tasks=("segm",), distributed=False, use_fast_impl=False)
    evaluator.reset()
    for d, stem in zip(DatasetCatalog.get(name), "abc"):
        inst = label_map_to_instances(labels[stem])
        evaluator.process([{"image_id": d["image_id"]}], [{"instances": inst}])
    res = evaluator.evaluate()
    assert res["segm"]["AP"] == pytest.approx(100.0)
    # a mask shrunk to a third of its pixels is no longer a match at IoU 0.5
    bad = labels["a"].copy()
    bad[2:6, 5:9] = 0
    evaluator.reset()
    for d, stem in zip(DatasetCatalog.get(name), "abc"):
        evaluator.process([{"image_id": d["image_id"]}], [{"instances": label_map_to_instances(
            bad if stem == "a" else labels[stem])}])
    assert evaluator.evaluate()["segm"]["AP"] < 100.0


def test_config_registration(converted, tmp_path):
    json_file, _ = converted
    cfg = add_nuclei_config(get_cfg())
    assert cfg.DATASETS.REGISTER == []
    n1, n2 = f"cfg_{uuid.uuid4().hex[:6]}", f"cfg_{uuid.uuid4().hex[:6]}"
    cfg.merge_from_list(["DATASETS.REGISTER", f"['{n1}:{json_file}', ['{n2}', '{json_file}', '{tmp_path}/im']]"])
    try:
        assert register_datasets_from_config(cfg) == [n1, n2]
        assert register_datasets_from_config(cfg) == [n1, n2]  # again: harmless
        assert len(DatasetCatalog.get(n1)) == 3 and MetadataCatalog.get(n2).image_root == str(tmp_path / "im")
    finally:
        unregister_nuclei_dataset(n1)
        unregister_nuclei_dataset(n2)
    cfg.DATASETS.REGISTER = ["only_a_name"]
    with pytest.raises(ValueError, match="'only_a_name': expected 'name:json_file\\[:image_root\\]'"):
        register_datasets_from_config(cfg)


def test_builtins_are_registered_at_import_without_files():
    import nuclei_d2  # noqa: F401

    expected = {"kumar_train", "kumar_test_same", "kumar_test_diff", "kumar_test", "monuseg2018_train",
                "monuseg2018_test", "cpm17_train", "cpm17_test", "tnbc", "pannuke_fold1", "pannuke_fold2",
                "pannuke_fold3", "dsb2018_stage1_train", "dsb2018_stage1_test"}
    assert expected <= set(DatasetCatalog.list()) and expected <= set(BUILTIN_DATASETS)
    meta = MetadataCatalog.get("kumar_test_diff")
    assert meta.train_organs == list(KUMAR_TRAIN_ORGANS) == ["breast", "kidney", "liver", "prostate"]
    assert meta.thing_classes == ["nucleus"] and meta.evaluator_type == "nuclei"
    assert MetadataCatalog.get("pannuke_fold2_types").thing_classes[0] == "neoplastic"
    path = Path(meta.json_file)
    assert path == builtin_json_path("kumar_test_diff") and path.parts[-2:] == ("kumar", "kumar_test_diff.json")
    if not path.exists():
        with pytest.raises(DatasetLoadError, match="prepare-builtin monuseg2018 --source"):
            DatasetCatalog.get("kumar_test_diff")


@pytest.fixture
def builtin_root(tmp_path):
    """Point the built-ins at a fresh root; restore the default registrations afterwards."""
    root = tmp_path / "datasets"
    register_all_builtin(root, overwrite=True)
    yield root
    register_all_builtin(overwrite=True)


@pytest.mark.real_data
def test_builtin_monuseg2018_prepare_and_load(shared_data, builtin_root):
    from nuclei_d2.data.converters import prepare_builtin

    start = time.perf_counter()
    written = prepare_builtin("monuseg2018", shared_data / "monuseg2018", builtin_root, show_progress=False)
    converted_s = time.perf_counter() - start
    assert sorted(p.relative_to(builtin_root).as_posix() for p in written) == [
        "kumar/kumar_test.json", "kumar/kumar_test_diff.json", "kumar/kumar_test_same.json",
        "kumar/kumar_train.json", "monuseg2018/monuseg2018_train.json"]
    start = time.perf_counter()
    train = DatasetCatalog.get("kumar_train")
    loaded_s = time.perf_counter() - start
    assert len(train) == 16 and {d["organ"] for d in train} == set(KUMAR_TRAIN_ORGANS)
    full = DatasetCatalog.get("monuseg2018_train")
    assert len(full) == 30 and sum(len(d["annotations"]) for d in full) == 16958
    counts = json.loads((shared_data / "monuseg2018" / "metadata.json").read_text())
    assert {Path(d["file_name"]).stem: len(d["annotations"]) for d in full} == \
        {k: v["n_nuclei_label"] for k, v in counts.items()}
    diff = DatasetCatalog.get("kumar_test_diff")
    seen = set(MetadataCatalog.get("kumar_test_diff").train_organs)
    assert len(diff) == 6 and not {d["organ"] for d in diff} & seen
    same = DatasetCatalog.get("kumar_test_same")
    assert len(same) == 8 and {d["organ"] for d in same} <= seen
    assert len(DatasetCatalog.get("kumar_test")) == 14
    with pytest.raises(DatasetLoadError, match="monuseg2018_test.json not found.*--test-source|monuseg2018_test"):
        DatasetCatalog.get("monuseg2018_test")
    print(f"prepare-builtin monuseg2018: {converted_s:.1f} s; loading kumar_train: {loaded_s * 1000:.0f} ms")


def test_detectron2_loader_runs_on_a_registered_dataset(name, converted):
    """The registered dicts go through Detectron2's own mapper and loader with bitmask masks."""
    from detectron2.data import DatasetMapper, build_detection_test_loader
    from detectron2.data import transforms as T

    json_file, _ = converted
    register_nuclei_dataset(name, json_file)
    mapper = DatasetMapper(is_train=True, augmentations=[T.NoOpTransform()], image_format="RGB",
                           use_instance_mask=True, instance_mask_format="bitmask")
    loader = build_detection_test_loader(DatasetCatalog.get(name), mapper=mapper, num_workers=0)
    batch = [b[0] for b in loader]
    assert [len(b["instances"]) for b in batch] == [3, 0, 1]
    assert isinstance(batch[0]["instances"].gt_masks.tensor, torch.Tensor)


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_prepare_builtin_cpm17_tnbc_pannuke_layouts(tmp_path, builtin_root):
    """The download layouts datasets/README.md describes convert into the JSONs the built-ins load."""
    import scipy.io

    from nuclei_d2.data.converters import prepare_builtin

    rgb = np.full((12, 12, 3), 180, np.uint8)
    inst = np.zeros((12, 12), np.int32)
    inst[1:4, 1:4] = 1
    inst[6:9, 6:10] = 2
    cpm = tmp_path / "cpm17"
    for split in ("train", "test"):
        _png(cpm / split / "Images" / "image_00.png", rgb)
        (cpm / split / "Labels").mkdir(parents=True)
        scipy.io.savemat(cpm / split / "Labels" / "image_00.mat", {"inst_map": inst})
    tnbc = tmp_path / "TNBC"
    mask = np.zeros((12, 12), np.uint8)
    mask[0:3, 0:3] = 255
    mask[3:5, 3:5] = 255   # diagonal contact: one nucleus with 8-connectivity
    mask[8:11, 1:11] = 255
    for slide in ("01", "02"):
        _png(tnbc / f"Slide_{slide}" / f"{slide}_1.png", rgb)
        _png(tnbc / f"GT_{slide}" / f"{slide}_1.png", mask)
    pn = tmp_path / "PanNuke" / "Fold 1"
    (pn / "images" / "fold1").mkdir(parents=True)
    (pn / "masks" / "fold1").mkdir(parents=True)
    masks = np.zeros((2, 8, 8, 6))
    masks[0, 1:3, 1:3, 3] = 7
    np.save(pn / "images" / "fold1" / "images.npy", np.full((2, 8, 8, 3), 100.0))
    np.save(pn / "images" / "fold1" / "types.npy", np.array(["Kidney", "Lung"]))
    np.save(pn / "masks" / "fold1" / "masks.npy", masks)

    prepare_builtin("cpm17", cpm, builtin_root, show_progress=False)
    prepare_builtin("tnbc", tnbc, builtin_root, show_progress=False)
    prepare_builtin("pannuke", tmp_path / "PanNuke", builtin_root, show_progress=False)

    assert [len(d["annotations"]) for d in DatasetCatalog.get("cpm17_train")] == [2]
    tn = DatasetCatalog.get("tnbc")
    assert [len(d["annotations"]) for d in tn] == [2, 2] and {d["organ"] for d in tn} == {"breast"}
    typed = DatasetCatalog.get("pannuke_fold1_types")
    assert [[a["category_id"] for a in d["annotations"]] for d in typed] == [[3], []]  # "dead" = index 3
    assert [d["organ"] for d in typed] == ["kidney", "lung"]
    plain = DatasetCatalog.get("pannuke_fold1")
    assert MetadataCatalog.get("pannuke_fold1").thing_classes == ["nucleus"]
    assert [d["file_name"] for d in plain] == [d["file_name"] for d in typed]
    assert Path(plain[0]["file_name"]) == builtin_root / "pannuke" / "fold1" / "00000.png"
    with pytest.raises(DatasetLoadError, match="pannuke_fold2.json not found"):
        DatasetCatalog.get("pannuke_fold2")


def test_prepare_builtin_monuseg2018_official_layout(tmp_path, builtin_root):
    """The official download (Tissue Images/ + Annotations/ XMLs, test tiles with XMLs side by side)."""
    import tifffile

    from nuclei_d2.data.converters import prepare_builtin
    from nuclei_d2.data.datasets import KUMAR_SPLITS, MONUSEG2018_TILE_ORGAN

    src = tmp_path / "MoNuSeg 2018 Training Data"
    test = tmp_path / "MoNuSegTestData"
    (src / "Annotations").mkdir(parents=True)
    (src / "Tissue Images").mkdir()
    test.mkdir()
    xml = ('<Annotations><Annotation Id="1"><Regions><Region Id="1"><Vertices><Vertex X="2" Y="2"/>'
           '<Vertex X="6" Y="2"/><Vertex X="6" Y="6"/><Vertex X="2" Y="6"/></Vertices></Region></Regions>'
           "</Annotation></Annotations>")
    for i, stem in enumerate(MONUSEG2018_TILE_ORGAN):
        tifffile.imwrite(src / "Tissue Images" / f"{stem}.tif", np.full((10, 10, 3), i, np.uint8))
        (src / "Annotations" / f"{stem}.xml").write_text(xml)
    for stem in ("TCGA-XX-0001", "TCGA-XX-0002"):
        tifffile.imwrite(test / f"{stem}.tif", np.zeros((10, 10, 3), np.uint8))
        (test / f"{stem}.xml").write_text(xml)
    written = prepare_builtin("monuseg2018", src, builtin_root, test_source=test, show_progress=False)
    assert len(written) == 6
    train = DatasetCatalog.get("kumar_train")
    assert [Path(d["file_name"]).stem for d in train] == sorted(KUMAR_SPLITS["kumar_train"], key=_natural)
    assert all(len(d["annotations"]) == 1 and d["organ"] == MONUSEG2018_TILE_ORGAN[Path(d["file_name"]).stem]
               for d in train)
    assert len(DatasetCatalog.get("monuseg2018_train")) == 30
    tst = DatasetCatalog.get("monuseg2018_test")
    assert len(tst) == 2 and all(d["organ"] is None for d in tst)
    assert MetadataCatalog.get("monuseg2018_test").train_organs == sorted(set(MONUSEG2018_TILE_ORGAN.values()))


def _natural(text: str) -> list:
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]
