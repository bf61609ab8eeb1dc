"""The embedded synthetic H&E-like dataset."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from nuclei_d2.data.synthetic import SyntheticSpec, load_synthetic, make_synthetic_tile, register_synthetic_datasets


def test_tile_has_touching_varied_stain_coloured_nuclei():
    image, label = make_synthetic_tile(256, 0)
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8
    assert label.dtype == np.int32 and label.shape == (256, 256)
    n = label.max()
    assert n >= 20 and set(np.unique(label)) == set(range(n + 1))  # 1..N, no gaps
    # Each nucleus is one connected piece.
    for i, sl in enumerate(ndimage.find_objects(label)):
        assert ndimage.label(label[sl] == i + 1)[1] == 1
    # Touching nuclei: some pixel of one nucleus is 4-adjacent to another nucleus.
    a, b = label[:, :-1], label[:, 1:]
    assert ((a > 0) & (b > 0) & (a != b)).sum() > 0
    # Varied sizes.
    areas = np.bincount(label.ravel())[1:]
    assert areas.max() > 3 * areas.min()
    # Stain-like: nuclei are darker and bluer (haematoxylin) than the pink background.
    fg, bg = image[label > 0].astype(float), image[label == 0].astype(float)
    assert fg.mean() < bg.mean() - 30
    assert fg[:, 2].mean() > fg[:, 0].mean()  # blue > red inside nuclei
    assert bg[:, 0].mean() > bg[:, 1].mean()  # pink stroma: red > green


def test_deterministic_and_seed_dependent():
    a1, l1 = make_synthetic_tile(64, 5)
    a2, l2 = make_synthetic_tile(64, 5)
    a3, _ = make_synthetic_tile(64, 6)
    assert (a1 == a2).all() and (l1 == l2).all() and not (a1 == a3).all()
    assert make_synthetic_tile((40, 70), 1)[0].shape == (40, 70, 3)


def test_dataset_files_are_written_once_and_registered(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    spec = SyntheticSpec(image_size=64, num_train=3, num_test=1, seed=2, root=tmp_path)
    dicts = load_synthetic(spec, "train")
    assert len(dicts) == 3 and (spec.folder / "done.json").is_file()
    mtime = (spec.folder / "done.json").stat().st_mtime_ns
    again = load_synthetic(spec, "train")
    assert (spec.folder / "done.json").stat().st_mtime_ns == mtime  # reused, not regenerated
    assert [d["file_name"] for d in dicts] == [d["file_name"] for d in again]
    d = dicts[0]
    assert d["height"] == d["width"] == 64 and len(d["annotations"]) > 0 and d["organ"] == "synthetic"
    register_synthetic_datasets(spec)
    try:
        assert len(DatasetCatalog.get("nuclei_synth_test")) == 1
        assert MetadataCatalog.get("nuclei_synth_test").thing_classes == ["nucleus"]
        assert MetadataCatalog.get("nuclei_synth_test").evaluator_type == "nuclei"
    finally:
        register_synthetic_datasets()


def test_synthetic_root_follows_the_datasets_root(tmp_path, monkeypatch):
    """The same root as the built-in datasets; an empty NUCLEI_D2_DATASETS means the default, not the working folder."""
    from nuclei_d2.data.datasets.builtin import datasets_root
    from nuclei_d2.data.synthetic import synthetic_root

    monkeypatch.setenv("NUCLEI_D2_DATASETS", str(tmp_path))
    assert synthetic_root() == tmp_path / "synthetic"
    monkeypatch.setenv("NUCLEI_D2_DATASETS", "")
    monkeypatch.chdir(tmp_path)
    assert synthetic_root() == datasets_root() / "synthetic" == tmp_path / "datasets" / "synthetic"
