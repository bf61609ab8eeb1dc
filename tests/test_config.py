"""add_nuclei_config and the config files: every YAML loads, mistakes give clear errors."""

from __future__ import annotations

import pytest
from conftest import CONFIGS
from detectron2.config import get_cfg

from nuclei_d2 import add_nuclei_config
from nuclei_d2.config import build_cfg
from nuclei_d2.engine.defaults import check_datasets, check_weights
from nuclei_d2.errors import ConfigError


def test_add_nuclei_config_only_adds_keys():
    base = get_cfg()
    cfg = add_nuclei_config(get_cfg())
    # Every Detectron2 key keeps its default value: nuclei values live in configs/Base-*.yaml.
    for key in ("MODEL.ANCHOR_GENERATOR.SIZES", "TEST.DETECTIONS_PER_IMAGE", "MODEL.PIXEL_STD", "INPUT.FORMAT"):
        a, b = cfg, base
        for part in key.split("."):
            a, b = a[part], b[part]
        assert a == b, key
    assert cfg.SOLVER.OPTIMIZER == "SGD"
    assert "SYNTHETIC" in cfg.DATASETS
    # Idempotent: a second call changes nothing.
    dumped = cfg.dump()
    add_nuclei_config(cfg)
    assert cfg.dump() == dumped


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_file_loads(path):
    cfg = build_cfg(str(path))
    assert cfg.MODEL.META_ARCHITECTURE


def test_nuclei_defaults_in_base_config():
    cfg = build_cfg(str(CONFIGS / "maskrcnn_baseline.yaml"))
    assert cfg.TEST.DETECTIONS_PER_IMAGE >= 1000  # a 1000x1000 tile holds up to ~1,000 nuclei
    assert min(s[0] for s in cfg.MODEL.ANCHOR_GENERATOR.SIZES) <= 8  # nuclei are ~8-40 px
    assert all(s > 1 for s in cfg.MODEL.PIXEL_STD)  # normalised input: random init does not diverge
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 1
    assert cfg.MODEL.RESNETS.DEPTH == 50


def test_unknown_key_in_overrides_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"unknown config key 'SOLVER.MAX_ITERS'.*SOLVER.MAX_ITER"):
        build_cfg(str(CONFIGS / "maskrcnn_baseline-tiny.yaml"), ["SOLVER.MAX_ITERS", "3"])


def test_unknown_key_in_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{CONFIGS / "maskrcnn_baseline-tiny.yaml"}"\nMODEL:\n  ANCHOR_SIZES: [[8]]\n')
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'MODEL.ANCHOR_SIZES'"):
        build_cfg(str(bad))


def test_missing_config_file_and_odd_overrides():
    with pytest.raises(ConfigError, match="config file not found"):
        build_cfg("/nonexistent/x.yaml")
    with pytest.raises(ConfigError, match="KEY VALUE pairs"):
        build_cfg(str(CONFIGS / "maskrcnn_baseline-tiny.yaml"), ["SOLVER.MAX_ITER"])


def test_missing_weights_file(tmp_path):
    with pytest.raises(ConfigError, match="weights file not found.*nope.pth"):
        check_weights(str(tmp_path / "nope.pth"))
    check_weights("")  # random init is fine
    (tmp_path / "w.pth").write_bytes(b"x")
    check_weights(str(tmp_path / "w.pth"))
    # With --resume and a checkpoint present, the weights are not used and not checked.
    (tmp_path / "last_checkpoint").write_text("model_final.pth")
    check_weights(str(tmp_path / "nope.pth"), resume=True, output_dir=str(tmp_path))


def test_unregistered_dataset_lists_close_names():
    import nuclei_d2  # noqa: F401

    with pytest.raises(ConfigError, match=r"'nuclei_synth_trian' is not registered.*Did you mean nuclei_synth_train"):
        check_datasets(["nuclei_synth_trian"], "DATASETS.TRAIN")
    check_datasets(["nuclei_synth_train"], "DATASETS.TRAIN")


@pytest.mark.parametrize(("steps", "message"), [("(20,)", r"contains SOLVER.MAX_ITER \(20\)"),
                                                ("(15, 10)", "must increase")])
def test_bad_lr_steps_are_named_before_training(steps, message):
    from nuclei_d2.engine import setup_cfg

    opts = ["MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", "20", "SOLVER.STEPS", steps]
    with pytest.raises(ConfigError, match=message):
        setup_cfg(str(CONFIGS / "maskrcnn_baseline-tiny.yaml"), opts)
    # evaluation does not build a scheduler; steps past MAX_ITER are dropped by Detectron2 (a warning), not an error
    setup_cfg(str(CONFIGS / "maskrcnn_baseline-tiny.yaml"), opts, eval_only=True)
    setup_cfg(str(CONFIGS / "maskrcnn_baseline-tiny.yaml"), ["MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", "20",
                                                             "SOLVER.STEPS", "(10, 30)"])


def test_integer_override_of_a_float_key_is_taken_as_a_float():
    from nuclei_d2.config import build_cfg
    from nuclei_d2.errors import ConfigError

    cfg = build_cfg(None, ["MODEL.NB.THRESHOLD", "1", "MODEL.TWO_STAGE.DILATE", "2", "SOLVER.MAX_ITER", "7"])
    assert cfg.MODEL.NB.THRESHOLD == 1.0 and isinstance(cfg.MODEL.NB.THRESHOLD, float)
    assert cfg.MODEL.TWO_STAGE.DILATE == 2.0 and cfg.SOLVER.MAX_ITER == 7  # int keys stay int
    with pytest.raises(ConfigError, match="MODEL.NB.THRESHOLD"):
        build_cfg(None, ["MODEL.NB.THRESHOLD", "'high'"])  # a wrong type is still refused
