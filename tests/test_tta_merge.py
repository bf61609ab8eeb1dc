"""Instance-level merging (nuclei_d2/inference/merge.py) on hand-made masks, TTA transforms and their inverses
(tta.py) on an asymmetric synthetic image, and the method-agnostic TestTimeWrapper (test_time.py): nuclei merged,
or dense models' probability maps averaged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from detectron2.structures import Instances
from scipy import ndimage
from torch import nn

from nuclei_d2.inference.merge import group_instances, mask_ious, merge_instances
from nuclei_d2.inference.test_time import TestTimeWrapper
from nuclei_d2.inference.tta import parse_tta_transforms, tta_input
from nuclei_d2.modeling.dense_base import DenseSegmentor
from nuclei_d2.structures import CropMasks


def rect(h: int, w: int, y0: int, y1: int, x0: int, x1: int, value: float = 1.0) -> np.ndarray:
    m = np.zeros((h, w), dtype=np.float32)
    m[y0:y1, x0:x1] = value
    return m


def member(masks: list[np.ndarray], scores: list[float], classes: list[int] | None = None) -> CropMasks:
    return CropMasks.from_masks(np.stack(masks), scores, classes)


# ---- CropMasks ---------------------------------------------------------------------------------------------------


def test_crop_masks_round_trip_recomputes_boxes():
    a = rect(10, 12, 2, 5, 3, 7)
    b = np.zeros((10, 12), np.float32)
    b[6, 1] = b[8, 4] = 1  # two separate pixels: the box spans both
    c = np.zeros((10, 12), np.float32)  # empty: dropped
    cm = member([a, b, c], [0.9, 0.8, 0.7], [0, 1, 2])
    assert len(cm) == 2
    assert cm.boxes.tolist() == [[3, 2, 7, 5], [1, 6, 5, 9]]
    inst = cm.to_instances()
    assert inst.image_size == (10, 12)
    assert inst.pred_boxes.tensor.tolist() == [[3.0, 2.0, 7.0, 5.0], [1.0, 6.0, 5.0, 9.0]]
    assert torch.equal(inst.pred_masks[0], torch.from_numpy(a > 0))
    assert torch.equal(inst.pred_masks[1], torch.from_numpy(b > 0))
    assert inst.scores.tolist() == pytest.approx([0.9, 0.8])
    assert inst.pred_classes.tolist() == [0, 1]


def test_crop_masks_rejects_inconsistent_input():
    with pytest.raises(ValueError, match="box 0"):
        CropMasks((5, 5), np.array([[0, 0, 6, 2]]), [np.ones((2, 6), np.float32)], [1.0], [0])
    with pytest.raises(ValueError, match="mask 0 has shape"):
        CropMasks((5, 5), np.array([[0, 0, 2, 2]]), [np.ones((3, 3), np.float32)], [1.0], [0])


def test_mask_ious_hand_computed():
    a = member([rect(10, 10, 2, 6, 2, 6), rect(10, 10, 0, 2, 8, 10)], [1, 1])  # 16 px; 4 px far away
    b = member([rect(10, 10, 2, 6, 4, 8)], [1])  # 16 px, overlaps a[0] on 4 x 2 = 8 px
    i, j, v = mask_ious(a, b)
    assert i.tolist() == [0] and j.tolist() == [0]
    assert v[0] == pytest.approx(8 / (16 + 16 - 8))


# ---- merging -----------------------------------------------------------------------------------------------------


def three_members():
    """Nucleus A seen by all three members (slightly different masks), B by member 0 only, C twice by member 1."""
    h = w = 20
    a0 = rect(h, w, 2, 6, 2, 6)   # 16 px
    a1 = rect(h, w, 2, 6, 2, 7)   # 20 px, IoU with a0 = 0.8
    a2 = rect(h, w, 2, 7, 2, 6)   # 20 px, IoU with a0 = 0.8
    b0 = rect(h, w, 12, 15, 12, 15)
    c1 = rect(h, w, 14, 18, 2, 6)
    c1b = rect(h, w, 14, 18, 2, 7)  # a duplicate of C from the same member
    return [member([a0, b0], [0.9, 0.95], [0, 1]),
            member([a1, c1, c1b], [0.6, 0.5, 0.4], [1, 0, 0]),
            member([a2], [0.3], [1])]


def test_group_instances_one_prediction_per_member_per_group():
    groups = group_instances(three_members(), iou_threshold=0.5)
    # Seeds by decreasing score: B (0.95, member 0), A (0.9, member 0), C (0.5, member 1), C duplicate (0.4).
    assert groups == [[(0, 1)], [(0, 0), (1, 0), (2, 0)], [(1, 1)], [(1, 2)]]


def test_merge_drops_singletons_and_averages():
    merged = merge_instances(three_members(), iou_threshold=0.5, min_votes=2)
    # Only A has two or more votes (B is a singleton, C's duplicates are the same member: no second vote).
    assert len(merged) == 1
    inst = merged.to_instances()
    # Mean of the three masks: 1 on a0 (in all three), 1/3 on a1's extra column and a2's extra row -> a0.
    assert torch.equal(inst.pred_masks[0], torch.from_numpy(rect(20, 20, 2, 6, 2, 6) > 0))
    assert inst.pred_boxes.tensor.tolist() == [[2.0, 2.0, 6.0, 6.0]]
    assert inst.scores.tolist() == pytest.approx([(0.9 + 0.6 + 0.3) / 3])
    assert inst.pred_classes.tolist() == [1]  # classes 0, 1, 1: the majority


def test_merge_min_votes_one_keeps_everything_and_sorts_by_score():
    merged = merge_instances(three_members(), iou_threshold=0.5, min_votes=1)
    assert len(merged) == 4
    assert merged.scores.tolist() == pytest.approx([0.95, 0.6, 0.5, 0.4])


def test_merge_iou_threshold_separates_weak_overlaps():
    a = member([rect(10, 10, 0, 4, 0, 4)], [0.9])
    b = member([rect(10, 10, 0, 4, 2, 6)], [0.8])  # IoU 8 / 24 = 1/3
    assert len(merge_instances([a, b], iou_threshold=0.5, min_votes=2)) == 0
    assert len(merge_instances([a, b], iou_threshold=0.3, min_votes=2)) == 1


def test_merge_averages_soft_masks():
    # Two members; pixel values 0.8 + 0.3 -> 0.55 (kept), 0.6 + 0.3 -> 0.45 (dropped), 1 + 0 (outside the other's
    # mask) -> 0.5 (kept: >= threshold).
    m0 = np.zeros((6, 6), np.float32)
    m1 = np.zeros((6, 6), np.float32)
    m0[1:4, 1:4] = 0.8
    m1[1:4, 1:4] = 0.9
    m0[1, 1], m1[1, 1] = 0.8, 0.3
    m0[1, 2], m1[1, 2] = 0.6, 0.3
    m0[4, 1] = 1.0
    merged = merge_instances([member([m0], [0.5]), member([m1], [1.0])], min_votes=2, mask_threshold=0.5)
    assert len(merged) == 1
    full = merged.to_instances().pred_masks[0].numpy()
    expected = np.zeros((6, 6), bool)
    expected[1:4, 1:4] = True
    expected[1, 2] = False
    expected[4, 1] = True
    assert np.array_equal(full, expected)
    soft = np.zeros((6, 6), np.float32)
    x0, y0, x1, y1 = merged.boxes[0]
    soft[y0:y1, x0:x1] = merged.masks[0]
    assert soft[1, 1] == pytest.approx(0.55) and soft[2, 2] == pytest.approx(0.85)
    assert merged.scores[0] == pytest.approx(0.75)


def test_merge_single_member_passes_through_and_min_votes_is_validated():
    only = member([rect(8, 8, 1, 3, 1, 3), rect(8, 8, 5, 7, 5, 7)], [0.9, 0.7])
    assert len(merge_instances([only], min_votes=2)) == 2  # clamped to the number of members
    with pytest.raises(ValueError, match="min_votes"):
        merge_instances([only], min_votes=0)
    with pytest.raises(ValueError, match="at least one member"):
        merge_instances([])


# ---- TTA transforms and inverses -----------------------------------------------------------------------------------


def asymmetric_image(h: int = 40, w: int = 64) -> tuple[torch.Tensor, np.ndarray]:
    """A non-square image with an L-shaped and a small square 'nucleus' near one corner: no flip or rotation maps it
    onto itself. Dark purple nuclei (low values) on a light background, 0-255 float, 3 x H x W."""
    label = np.zeros((h, w), np.int32)
    label[3:15, 4:8] = 1
    label[11:15, 4:14] = 1  # the L
    label[25:31, 45:49] = 2
    rgb = np.full((h, w, 3), 230.0, np.float32)
    rgb[label > 0] = (90.0, 40.0, 140.0)
    return torch.from_numpy(rgb.transpose(2, 0, 1).copy()), label


class ThresholdModel(nn.Module):
    """A 'model' with the project's contract: nuclei = connected components of dark pixels, at the input's size.

    With ``ghost_when_flipped`` it also reports a spurious nucleus in the top-left corner of every copy whose top-left
    pixel is background in the original (a transform-dependent false positive).
    """

    def __init__(self, ghost: bool = False):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.ghost = ghost
        self.calls = 0

    def forward(self, batched_inputs):
        out = []
        for inp in batched_inputs:
            self.calls += 1
            img = inp["image"].numpy()
            dark = img[:3].mean(axis=0) < 150
            if self.ghost:
                dark = dark.copy()
                dark[0:2, 0:2] = self.calls % 4 == 2  # only on the second call of every four
            label, n = ndimage.label(dark)
            masks = torch.from_numpy(np.stack([label == i for i in range(1, n + 1)]) if n else np.zeros((0,) +
                                     label.shape, bool))
            inst = Instances(label.shape)
            inst.pred_masks = masks
            inst.scores = torch.linspace(0.9, 0.5, n) if n else torch.zeros(0)
            inst.pred_classes = torch.zeros(n, dtype=torch.int64)
            assert (inp["height"], inp["width"]) == label.shape
            out.append({"instances": inst})
        return out


TRANSFORMS = ["identity", "hflip", "vflip", "rot90", "rot180", "rot270", "hflip+rot90", "vflip+rot270", "hue:0.1"]


@pytest.mark.parametrize("name", TRANSFORMS)
def test_tta_inverse_puts_masks_back(name):
    image, label = asymmetric_image()
    inp = {"image": image, "height": 40, "width": 64, "file_name": "synthetic.png", "label_map": torch.zeros(1)}
    (t,) = parse_tta_transforms([name])
    copy = tta_input(inp, t)
    assert "label_map" not in copy  # ground truth of the original frame is dropped
    model = ThresholdModel()
    pred = CropMasks.from_instances(model([copy])[0]["instances"])
    back = t.invert(pred, 40, 64)
    got = sorted(tuple(map(tuple, np.argwhere(m >= 0.5) + b[[1, 0]])) for b, m in zip(back.boxes, back.masks))
    want = sorted(tuple(map(tuple, np.argwhere(label == v))) for v in (1, 2))
    assert got == want
    if t.is_geometric:  # without the inverse the masks would be elsewhere (the test can fail)
        raw = sorted(tuple(map(tuple, np.argwhere(m >= 0.5) + b[[1, 0]])) for b, m in zip(pred.boxes, pred.masks))
        assert raw != want


def test_tta_output_sizes_and_bad_names():
    rot, both = parse_tta_transforms(["rot90", "hflip+rot270"])
    assert rot.output_size(40, 64) == (64, 40) and both.output_size(40, 64) == (64, 40)
    with pytest.raises(ValueError, match="unknown transform 'flip'"):
        parse_tta_transforms(["flip"])
    with pytest.raises(ValueError, match="bad hue shift"):
        parse_tta_transforms(["hue:abc"])


def test_hue_copy_recomputes_hematoxylin_channel():
    from nuclei_d2.stain import hematoxylin_channel

    image, _ = asymmetric_image()
    rgb_u8 = image.numpy().transpose(1, 2, 0).astype(np.uint8)
    h = torch.from_numpy(hematoxylin_channel(rgb_u8) * 255.0)[None]
    inp = {"image": torch.cat([image, h, torch.zeros_like(h)]), "height": 40, "width": 64}
    (t,) = parse_tta_transforms(["hue"], hue_delta=0.25)
    copy = tta_input(inp, t, extra_channels=["hematoxylin", "distance"])
    shifted = copy["image"][:3].numpy().transpose(1, 2, 0).astype(np.uint8)
    assert not np.array_equal(shifted, rgb_u8)
    expected = hematoxylin_channel(np.ascontiguousarray(shifted)) * 255.0
    assert np.allclose(copy["image"][3].numpy(), expected, atol=1e-3)
    assert not np.allclose(copy["image"][3].numpy(), h[0].numpy(), atol=1.0)
    assert torch.equal(copy["image"][4], inp["image"][4])  # the distance channel is untouched


# ---- the wrapper --------------------------------------------------------------------------------------------------


def test_wrapper_merges_copies_and_drops_transform_dependent_false_positives():
    image, label = asymmetric_image()
    inp = {"image": image, "height": 40, "width": 64}
    transforms = parse_tta_transforms(["identity", "hflip", "vflip", "rot90"])
    single = ThresholdModel(ghost=True)
    wrapper = TestTimeWrapper([single], transforms, min_votes=2).eval()
    out = wrapper([inp])[0]["instances"]
    assert single.calls == 4
    masks = out.pred_masks.numpy()
    assert len(masks) == 2  # the ghost was seen by one copy only
    assert sorted(int(m.sum()) for m in masks) == sorted(int((label == v).sum()) for v in (1, 2))
    for m in masks:
        assert len(np.unique(label[m])) == 1 and label[m][0] > 0
    assert out.has("pred_boxes") and out.has("scores")
    kept_all = TestTimeWrapper([ThresholdModel(ghost=True)], transforms, min_votes=1).eval()([inp])[0]["instances"]
    assert len(kept_all) == 3
    with pytest.raises(RuntimeError, match="inference only"):
        wrapper.train()([inp])


class FixedModel(nn.Module):
    """A 'model' that predicts the same overlapping nuclei on every input: a nucleus, its second detection shifted
    by two pixels (90% under the first, scored lower) and one alone."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, batched_inputs):
        masks = torch.zeros(3, 40, 64, dtype=torch.bool)
        masks[0, 0:20, 0:20] = masks[1, 0:20, 2:22] = masks[2, 25:35, 40:50] = True
        inst = Instances((40, 64), pred_masks=masks, scores=torch.tensor([0.9, 0.8, 0.7]),
                         pred_classes=torch.zeros(3, dtype=torch.int64))
        return [{"instances": inst} for _ in batched_inputs]


def test_wrapper_drops_merged_nuclei_hidden_under_better_ones():
    image, _ = asymmetric_image()
    inp = {"image": image, "height": 40, "width": 64}
    transforms = parse_tta_transforms(["identity"])
    kept = TestTimeWrapper([FixedModel()], transforms, min_votes=1).eval()([inp])[0]["instances"]
    assert kept.scores.tolist() == pytest.approx([0.9, 0.8, 0.7])
    out = TestTimeWrapper([FixedModel()], transforms, min_votes=1, min_visible=0.5).eval()([inp])[0]["instances"]
    assert out.scores.tolist() == pytest.approx([0.9, 0.7])
    with pytest.raises(ValueError, match="MIN_VISIBLE_FRACTION"):
        TestTimeWrapper([FixedModel()], transforms, min_visible=-0.1)


def test_wrapper_ensemble_of_models_votes():
    image, _ = asymmetric_image()
    inp = {"image": image, "height": 40, "width": 64}
    # Three models, one identity copy each: a nucleus needs two of the three.
    wrapper = TestTimeWrapper([ThresholdModel(), ThresholdModel(), ThresholdModel()], None, min_votes=3).eval()
    assert wrapper.num_predictions == 3
    assert len(wrapper([inp])[0]["instances"]) == 2



def test_wrappers_sharing_a_prediction_cache_predict_each_copy_once():
    # Two wrappers of the same model with overlapping copy sets and different votes (a tune_inference grid): with one
    # cache the second predicts only its new copy, and both give what they give without the cache.
    from nuclei_d2.inference.prediction_cache import PredictionCache

    image, _ = asymmetric_image()
    inp = {"image": image, "height": 40, "width": 64, "file_name": "a.png"}
    model = ThresholdModel(ghost=True)
    first = parse_tta_transforms(["identity", "hflip", "vflip", "rot90"])
    second = parse_tta_transforms(["identity", "hflip", "vflip", "rot90", "rot180"])
    plain = [TestTimeWrapper([ThresholdModel(ghost=True)], ts, min_votes=v).eval()([inp])[0]["instances"]
             for ts, v in ((first, 2), (second, 3))]
    cache = PredictionCache()
    outs = []
    for ts, v in ((first, 2), (second, 3)):
        wrapper = TestTimeWrapper([model], ts, min_votes=v).eval()
        wrapper.prediction_cache = cache
        first_soft = wrapper.soft_masks
        outs.append(wrapper([inp])[0]["instances"])
    assert model.calls == 5 and (cache.computed, cache.reused) == (5, 4)
    for out, want in zip(outs, plain):
        assert out.scores.tolist() == pytest.approx(want.scores.tolist())
        assert torch.equal(out.pred_masks, want.pred_masks)
    # another image, or soft instead of hard masks, is another entry
    wrapper = TestTimeWrapper([model], first[:1], min_votes=1, soft_masks=not first_soft).eval()
    wrapper.prediction_cache = cache
    wrapper([dict(inp, file_name="b.png")])
    wrapper([inp])
    assert model.calls == 7 and len(cache) == 7

    # a dense member's map sum over the copies: computed once for two wrappers merging it alike
    dense = RampSegmentor().eval()
    copies = parse_tta_transforms(["identity", "hflip"])
    maps = []
    for _ in range(2):
        wrapper = TestTimeWrapper([dense], copies).eval()
        wrapper.prediction_cache = cache
        maps.append(wrapper([inp])[0]["probs"])
    assert len(dense.seen) == 2 and torch.equal(maps[0], maps[1])
    alone = TestTimeWrapper([RampSegmentor()], copies).eval()([inp])[0]["probs"]
    torch.testing.assert_close(maps[0], alone)

# ---- dense models: probability maps averaged before post-processing -------------------------------------------------


@pytest.mark.parametrize("name", [n for n in TRANSFORMS if n != "hue:0.1"])
def test_invert_map_undoes_the_copy(name):
    (t,) = parse_tta_transforms([name])
    maps = torch.rand(3, 40, 64)
    copy = torch.from_numpy(t.apply_image(maps.numpy().transpose(1, 2, 0)).transpose(2, 0, 1).copy())
    assert tuple(copy.shape[-2:]) == t.output_size(40, 64)
    assert torch.equal(t.invert_map(copy, 40, 64), maps)
    if t.is_geometric:
        assert copy.shape != maps.shape or not torch.equal(copy, maps)
    with pytest.raises(ValueError, match="transformed copy"):
        t.invert_map(torch.rand(3, 41, 64), 40, 64)


class RampSegmentor(DenseSegmentor):
    """A dense 'model' that is not flip-equivariant: foreground probability 0.6 on dark pixels plus a left-to-right
    ramp 0 -> 0.7 in the frame it sees; post-processing = connected components of foreground > 0.5."""

    prob_names = ("foreground",)

    def __init__(self):
        super().__init__(pixel_mean=[0.0] * 3, pixel_std=[1.0] * 3)
        self.dummy = nn.Parameter(torch.zeros(1))
        self.seen = []

    def dense_probs(self, x):
        self.seen.append(tuple(x.shape[-2:]))
        dark = (x[:, :3].mean(1, keepdim=True) < 150).float()
        ramp = torch.linspace(0, 0.7, x.shape[-1]).view(1, 1, 1, -1)
        return dark * 0.6 + ramp

    def postprocess(self, probs):
        label, n = ndimage.label(probs[0] > 0.5)
        return label.astype(np.int32), np.ones(n, np.float32)


def test_dense_members_average_maps_in_the_original_frame():
    image, label = asymmetric_image()
    inp = {"image": image, "height": 40, "width": 64}
    model = RampSegmentor().eval()
    single = model([inp])[0]
    truth = torch.from_numpy(ndimage.label(label > 0)[0].astype(np.int32))
    # Alone, the ramp pushes the right part of the background over 0.5 (a false 'nucleus' swallowing nucleus 2).
    assert not torch.equal(single["label_map"], truth)
    wrapper = TestTimeWrapper([model], parse_tta_transforms(["identity", "hflip", "rot90"]))
    assert wrapper.merge_mode == "probs"
    out = wrapper.eval()([inp])[0]
    assert model.seen[-3:] == [(40, 64), (40, 64), (64, 40)]
    # Mapped back, the identity and flipped ramps sum to a flat 0.7, and the rot90 copy's ramp runs down the rows
    # (its column j is row j of the original): the dark pixels are where they are in the original, and the
    # background stays below 0.5.
    dark = torch.from_numpy((label > 0).astype(np.float32))
    ramp = torch.linspace(0, 0.7, 64)
    rot_ramp = torch.linspace(0, 0.7, 40).view(-1, 1).expand(40, 64)
    want = dark * 0.6 + (ramp + ramp.flip(0) + rot_ramp) / 3
    torch.testing.assert_close(out["probs"][0], want)
    assert torch.equal(out["label_map"], truth)
    assert len(out["instances"]) == 2 and out["instances"].pred_masks.shape == (2, 40, 64)
    # Merging nuclei instead keeps the copies' own false positives apart and votes them out only where they differ.
    by_nuclei = TestTimeWrapper([RampSegmentor()], parse_tta_transforms(["identity", "hflip", "rot90"]),
                                merge="instances").eval()
    assert by_nuclei.merge_mode == "instances" and "label_map" not in by_nuclei([inp])[0]


def test_merge_mode_auto_and_probs_need_dense_members():
    transforms = parse_tta_transforms(["identity", "hflip"])
    assert TestTimeWrapper([ThresholdModel()], transforms).merge_mode == "instances"
    assert TestTimeWrapper([RampSegmentor(), ThresholdModel()], transforms).merge_mode == "instances"
    with pytest.raises(ValueError, match="ThresholdModel \\(not dense\\)"):
        TestTimeWrapper([RampSegmentor(), ThresholdModel()], transforms, merge="probs")
    with pytest.raises(ValueError, match="TEST.MERGE.MODE must be one of"):
        TestTimeWrapper([RampSegmentor()], transforms, merge="mean")


def test_dense_tta_from_a_config_matches_the_model_on_identity_and_runs_the_transforms():
    from conftest import tiny_cfg
    from detectron2.data import DatasetCatalog

    from nuclei_d2.data.mapper import NucleiDatasetMapper
    from nuclei_d2.inference.test_time import build_test_time_wrapper
    from nuclei_d2.modeling import build_nuclei_model

    torch.manual_seed(0)
    cfg = tiny_cfg("nb_unet-tiny.yaml", "TEST.AUG.ENABLED", "True", "TEST.AUG.TRANSFORMS", "['identity']",
                   "MODEL.NB.THRESHOLD", "0.3")
    model = build_nuclei_model(cfg).eval()
    inp = NucleiDatasetMapper(cfg, is_train=False)(DatasetCatalog.get(cfg.DATASETS.TEST[0])[0])
    wrapper = build_test_time_wrapper(cfg, model).eval()
    assert wrapper.merge_mode == "probs"
    alone, wrapped = model([inp])[0], wrapper([inp])[0]
    assert torch.equal(alone["label_map"], wrapped["label_map"]) and torch.equal(alone["probs"], wrapped["probs"])
    cfg4 = tiny_cfg("nb_unet-tiny.yaml", "TEST.AUG.ENABLED", "True", "TEST.AUG.TRANSFORMS",
                    "['identity', 'hflip', 'rot90', 'hue']", "MODEL.NB.THRESHOLD", "0.3")
    four = build_test_time_wrapper(cfg4, model).eval()([inp])[0]
    assert four["probs"].shape == alone["probs"].shape
    torch.testing.assert_close(four["probs"].sum(0), torch.ones(alone["probs"].shape[1:]))  # still softmax maps
    assert not torch.allclose(four["probs"], alone["probs"])  # a random-init U-Net is not flip-invariant


# ---- multi-scale copies (scale:<factor>) ----------------------------------------------------------------------------


def test_scale_copies_parse_compose_and_reject_bad_factors():
    up, flipped_down, plain = parse_tta_transforms(["scale:1.5", "hflip+scale:0.5", "hflip"])
    assert up.scale == 1.5 and flipped_down.scale == 0.5 and plain.scale == 1.0
    assert not up.is_geometric and flipped_down.is_geometric  # a scale alone needs no inverse
    assert up.output_size(40, 64) == (40, 64)  # predictions come back at the input's height x width
    for bad in ("scale:0", "scale:abc", "scale:nan", "scale:50"):
        with pytest.raises(ValueError, match="bad scale"):
            parse_tta_transforms([bad])


class ResizingThresholdModel(ThresholdModel):
    """:class:`ThresholdModel` at any input size, returning its nuclei at the input's ``height x width`` (nearest),
    as every nuclei-d2 model does; it records the sizes it saw."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, batched_inputs):
        out = []
        for inp in batched_inputs:
            self.seen.append(tuple(inp["image"].shape[-2:]))
            dark = (inp["image"][:3].mean(0) < 150).float()
            dark = torch.nn.functional.interpolate(dark[None, None], size=(inp["height"], inp["width"]),
                                                   mode="nearest")[0, 0].numpy() > 0.5
            label, n = ndimage.label(dark)
            inst = Instances(label.shape)
            inst.pred_masks = torch.from_numpy(np.stack([label == i for i in range(1, n + 1)]))
            inst.scores = torch.full((n,), 0.9)
            inst.pred_classes = torch.zeros(n, dtype=torch.int64)
            out.append({"instances": inst})
        return out


def test_scale_copies_predict_at_the_scaled_size_and_merge_in_the_original_frame():
    image, label = asymmetric_image()
    inp = {"image": image, "height": 40, "width": 64}
    model = ResizingThresholdModel()
    wrapper = TestTimeWrapper([model], parse_tta_transforms(["identity", "scale:2", "hflip+scale:2"]),
                              min_votes=3).eval()
    out = wrapper([inp])[0]["instances"]
    assert model.seen == [(40, 64), (80, 128), (80, 128)]
    masks = out.pred_masks.numpy()
    assert len(masks) == 2 and masks.shape[1:] == (40, 64)
    for v in (1, 2):  # every copy found each nucleus where it is in the original (3 votes of 3)
        truth = label == v
        best = max((m & truth).sum() / (m | truth).sum() for m in masks)
        assert best >= 0.9


def test_scale_copies_of_a_dense_model_come_back_at_the_original_size():
    image, _ = asymmetric_image()
    inp = {"image": image, "height": 40, "width": 64}
    model = RampSegmentor().eval()
    wrapper = TestTimeWrapper([model], parse_tta_transforms(["scale:0.5"]))
    probs = wrapper.member_map(0, wrapper.transforms[0], inp)
    assert model.seen[-1] == (20, 32) and tuple(probs.shape) == (1, 40, 64)


def test_a_real_mask_rcnn_plus_predicts_a_scale_copy_at_the_scaled_size():
    # The tiny Mask R-CNN+ (RGB + haematoxylin + distance) through the config: the scale copy is one resize of the
    # mapped input (the haematoxylin channel recomputed from the resized RGB), and the nuclei come back at the tile's
    # size, where the evaluators score them.
    from conftest import tiny_cfg

    from nuclei_d2.inference.test_time import build_test_time_wrapper
    from nuclei_d2.modeling import build_nuclei_model

    torch.manual_seed(0)
    cfg = tiny_cfg("maskrcnn_plus-tiny.yaml", "DATASETS.SYNTHETIC.IMAGE_SIZE", "128", "TEST.AUG.ENABLED", "True",
                   "TEST.AUG.TRANSFORMS", "['identity', 'scale:1.5']", "TEST.MERGE.MIN_VOTES", "1",
                   "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0")
    model = build_nuclei_model(cfg).eval()
    seen = []
    model.backbone.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape[-2:])))
    inp = _mapped(cfg)
    wrapper = build_test_time_wrapper(cfg, model).eval()
    with torch.no_grad():
        out = wrapper([inp])[0]["instances"]
    assert seen == [(128, 128), (192, 192)]  # both divisible by the backbone's 32: no padding
    assert out.image_size == (128, 128) and len(out) > 0


def test_brpnet_segment_probs_refines_only_with_the_image(monkeypatch):
    from conftest import tiny_cfg

    from nuclei_d2.modeling import build_nuclei_model

    cfg = tiny_cfg("brpnet_stage2-tiny.yaml", "MODEL.BRPNET.STAGE1.WEIGHTS", "", "MODEL.BRPNET.INFERENCE", "refine")
    model = build_nuclei_model(cfg).eval()
    probs = np.zeros((2, 40, 64), np.float32)
    probs[0, 10:30, 10:30] = 1.0  # one 20 x 20 nucleus, no boundary inside it
    calls = []

    def fake_refine(image, semantic, boundary, proposals):
        calls.append(tuple(image.shape))
        return proposals * 0, np.zeros(0, np.float32)

    monkeypatch.setattr(model, "refine", fake_refine)
    label, _ = model.segment_probs(probs)
    assert label.max() == 1 and not calls  # proposals only
    label, _ = model.segment_probs(probs, torch.zeros(3, 40, 64))
    assert calls == [(3, 40, 64)] and label.max() == 0  # the refinement's answer is returned


# ---- ensemble members at their own magnification -----------------------------------------------------------------


def _mapped(cfg):
    from detectron2.data import DatasetCatalog

    from nuclei_d2.data.mapper import NucleiDatasetMapper

    return NucleiDatasetMapper(cfg, is_train=False)(DatasetCatalog.get("nuclei_synth_test")[0])


def test_rescale_input_makes_the_image_a_members_own_mapper_makes():
    # Mask R-CNN+ tiny (RGB + haematoxylin + distance) with INPUT.MIN_SIZE_TEST 192: its mapper upsamples the 128 px
    # synthetic tile 1.5x. rescale_input from the original-size input must give that very tensor (RGB by the same
    # transform, haematoxylin recomputed from the resized RGB, not interpolated).
    from conftest import tiny_cfg

    from nuclei_d2.inference.tta import rescale_input

    synth = ("DATASETS.SYNTHETIC.IMAGE_SIZE", "128")
    native = _mapped(tiny_cfg("maskrcnn_plus-tiny.yaml", *synth, "INPUT.MIN_SIZE_TEST", "0"))
    own = _mapped(tiny_cfg("maskrcnn_plus-tiny.yaml", *synth, "INPUT.MIN_SIZE_TEST", "192"))
    assert tuple(native["image"].shape) == (5, 128, 128) and tuple(own["image"].shape) == (5, 192, 192)
    out = rescale_input(native, (192, 192), ["hematoxylin", "distance"])
    assert (out["height"], out["width"]) == (128, 128)  # predictions still come back at the tile's size
    assert torch.equal(out["image"], own["image"])
    assert rescale_input(native, (128, 128), ["hematoxylin", "distance"]) is native


@pytest.mark.parametrize("resolution", [("INPUT.NUCLEI.SCALE", "1.5"), ("INPUT.MIN_SIZE_TEST", "192")])
def test_an_ensemble_member_trained_at_another_magnification_predicts_at_its_own(tmp_path, resolution):
    # Two NB U-Nets with the same random weights, one configured at 1.5x (a magnification or a shortest edge of 192
    # px): as the second member of an ensemble evaluated at the tiles' own size, the 1.5x one predicts exactly what
    # it predicts alone from its own mapper's input -- and not what it would predict from the unresized tile.
    from conftest import tiny_cfg

    from nuclei_d2.inference.ensemble import inference_resolution
    from nuclei_d2.inference.test_time import build_test_time_wrapper
    from nuclei_d2.modeling import build_nuclei_model

    synth = ("DATASETS.SYNTHETIC.IMAGE_SIZE", "128")
    main_cfg = tiny_cfg("nb_unet-tiny.yaml", *synth)
    up_cfg = tiny_cfg("nb_unet-tiny.yaml", *synth, *resolution)
    torch.manual_seed(0)
    model = build_nuclei_model(main_cfg).eval()
    weights = tmp_path / "nb.pth"
    torch.save({"model": model.state_dict()}, weights)
    (tmp_path / "up.yaml").write_text(up_cfg.dump())
    cfg = main_cfg.clone()
    cfg.defrost()
    cfg.TEST.ENSEMBLE.WEIGHTS = [str(weights)]
    cfg.TEST.ENSEMBLE.CONFIGS = [str(tmp_path / "up.yaml")]
    cfg.TEST.MERGE.MODE = "instances"
    wrapper = build_test_time_wrapper(cfg, model)
    assert wrapper.members[0].resize is None and wrapper.members[1].resize == inference_resolution(up_cfg)

    native, own = _mapped(main_cfg), _mapped(up_cfg)
    identity = wrapper.transforms[0]
    with torch.no_grad():
        in_ensemble = wrapper.member_map(1, identity, native)
        alone = model.predict_probs(own["image"])
        at_tile_size = model.predict_probs(native["image"])
    alone = torch.nn.functional.interpolate(alone[None], size=(128, 128), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(in_ensemble, alone, atol=1e-6)
    assert not torch.allclose(in_ensemble, at_tile_size, atol=1e-3)
    nuclei = wrapper.member_copy(1, identity, native)
    assert nuclei.image_size == (128, 128)
