"""Fixed facts of the standard protocols (tile ids, organs, splits), so they need no file from the user.

Kumar et al., IEEE TMI 36(7), 2017 ("A Dataset and a Technique for Generalized Nuclear Segmentation for
Computational Pathology"), Sec. IV: the 30 MoNuSeg 2018 training tiles (7 organs, 40x, 1000x1000 from TCGA) split
into 16 training tiles (4 each of breast, kidney, liver, prostate), 8 same-organ test tiles (2 of each training organ)
and 6 new-organ test tiles (2 each of bladder, colon, stomach). Lists and organs are those of
``../shared/data/monuseg2018/{splits,metadata}.json``.
"""

from __future__ import annotations

__all__ = ["KUMAR_SPLITS", "PANNUKE_TYPES", "KUMAR_TRAIN_ORGANS", "MONUSEG2018_TRAIN_ORGANS", "MONUSEG2018_TILE_ORGAN"]

#: Organ of each MoNuSeg 2018 training tile (= the Kumar 2017 set).
MONUSEG2018_TILE_ORGAN: dict[str, str] = {
    "TCGA-A7-A13E-01Z-00-DX1": "breast",
    "TCGA-A7-A13F-01Z-00-DX1": "breast",
    "TCGA-AR-A1AK-01Z-00-DX1": "breast",
    "TCGA-AR-A1AS-01Z-00-DX1": "breast",
    "TCGA-E2-A1B5-01Z-00-DX1": "breast",
    "TCGA-E2-A14V-01Z-00-DX1": "breast",
    "TCGA-B0-5711-01Z-00-DX1": "kidney",
    "TCGA-HE-7128-01Z-00-DX1": "kidney",
    "TCGA-HE-7129-01Z-00-DX1": "kidney",
    "TCGA-HE-7130-01Z-00-DX1": "kidney",
    "TCGA-B0-5698-01Z-00-DX1": "kidney",
    "TCGA-B0-5710-01Z-00-DX1": "kidney",
    "TCGA-18-5592-01Z-00-DX1": "liver",
    "TCGA-38-6178-01Z-00-DX1": "liver",
    "TCGA-49-4488-01Z-00-DX1": "liver",
    "TCGA-50-5931-01Z-00-DX1": "liver",
    "TCGA-21-5784-01Z-00-DX1": "liver",
    "TCGA-21-5786-01Z-00-DX1": "liver",
    "TCGA-G9-6336-01Z-00-DX1": "prostate",
    "TCGA-G9-6348-01Z-00-DX1": "prostate",
    "TCGA-G9-6356-01Z-00-DX1": "prostate",
    "TCGA-G9-6363-01Z-00-DX1": "prostate",
    "TCGA-CH-5767-01Z-00-DX1": "prostate",
    "TCGA-G9-6362-01Z-00-DX1": "prostate",
    "TCGA-DK-A2I6-01A-01-TS1": "bladder",
    "TCGA-G2-A2EK-01A-02-TSB": "bladder",
    "TCGA-AY-A8YK-01A-01-TS1": "colon",
    "TCGA-NH-A8F7-01A-01-TS1": "colon",
    "TCGA-KB-A93J-01A-01-TS1": "stomach",
    "TCGA-RD-A8N9-01A-01-TS1": "stomach",
}

#: The Kumar 2017 split, by built-in dataset name.
KUMAR_SPLITS: dict[str, tuple[str, ...]] = {
    "kumar_train": (
        "TCGA-A7-A13E-01Z-00-DX1", "TCGA-A7-A13F-01Z-00-DX1", "TCGA-AR-A1AK-01Z-00-DX1", "TCGA-AR-A1AS-01Z-00-DX1",
        "TCGA-B0-5711-01Z-00-DX1", "TCGA-HE-7128-01Z-00-DX1", "TCGA-HE-7129-01Z-00-DX1", "TCGA-HE-7130-01Z-00-DX1",
        "TCGA-18-5592-01Z-00-DX1", "TCGA-38-6178-01Z-00-DX1", "TCGA-49-4488-01Z-00-DX1", "TCGA-50-5931-01Z-00-DX1",
        "TCGA-G9-6336-01Z-00-DX1", "TCGA-G9-6348-01Z-00-DX1", "TCGA-G9-6356-01Z-00-DX1", "TCGA-G9-6363-01Z-00-DX1",
    ),
    "kumar_test_same": (
        "TCGA-E2-A1B5-01Z-00-DX1", "TCGA-E2-A14V-01Z-00-DX1", "TCGA-B0-5698-01Z-00-DX1", "TCGA-B0-5710-01Z-00-DX1",
        "TCGA-21-5784-01Z-00-DX1", "TCGA-21-5786-01Z-00-DX1", "TCGA-CH-5767-01Z-00-DX1", "TCGA-G9-6362-01Z-00-DX1",
    ),
    "kumar_test_diff": (
        "TCGA-DK-A2I6-01A-01-TS1", "TCGA-G2-A2EK-01A-02-TSB", "TCGA-AY-A8YK-01A-01-TS1", "TCGA-NH-A8F7-01A-01-TS1",
        "TCGA-KB-A93J-01A-01-TS1", "TCGA-RD-A8N9-01A-01-TS1",
    ),
}
KUMAR_SPLITS["kumar_test"] = KUMAR_SPLITS["kumar_test_same"] + KUMAR_SPLITS["kumar_test_diff"]

#: Organs seen in training by the Kumar protocol (the evaluator's "seen organ" group).
KUMAR_TRAIN_ORGANS: tuple[str, ...] = tuple(sorted({MONUSEG2018_TILE_ORGAN[s] for s in KUMAR_SPLITS["kumar_train"]}))

#: Organs seen in training when all 30 MoNuSeg 2018 training tiles are used.
MONUSEG2018_TRAIN_ORGANS: tuple[str, ...] = tuple(sorted(set(MONUSEG2018_TILE_ORGAN.values())))

#: Nucleus types of PanNuke's mask channels 0-4 (Gamper et al., 2019/2020); category ids 1-5 when types are kept.
PANNUKE_TYPES: tuple[str, ...] = ("neoplastic", "inflammatory", "connective", "dead", "epithelial")
