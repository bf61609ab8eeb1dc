"""nuclei_d2.layers.morphology: the one disk kernel and keep-largest-piece renumbering (issue 23)."""

import numpy as np

from nuclei_d2.layers.morphology import disk, keep_largest_pieces


def test_disk_by_hand():
    assert disk(0).tolist() == [[True]]
    assert disk(1).astype(int).tolist() == [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    assert disk(1.5).all() and disk(1.5).shape == (3, 3)  # corners at sqrt(2) <= 1.5
    d2 = disk(2)
    assert d2.shape == (5, 5) and d2.sum() == 13 and not d2[0, 0] and d2[0, 2]


def test_keep_largest_pieces_keeps_one_piece_drops_small_and_renumbers():
    label = np.zeros((8, 12), np.uint16)
    label[0:3, 0:3] = 5  # object 5: a 9 px piece ...
    label[6:8, 0:1] = 5  # ... and a 2 px piece (dropped)
    label[0:1, 6:8] = 2  # object 2: 2 px, under min_size
    label[4:8, 6:12] = 9  # object 9: 24 px
    out = keep_largest_pieces(label, min_size=3)
    assert out.dtype == np.uint16
    assert sorted(np.unique(out).tolist()) == [0, 1, 2]  # 5 -> 1, 9 -> 2 (old id order), 2 dropped
    assert (out == 1).sum() == 9 and (out[0:3, 0:3] == 1).all() and (out[6:8, 0] == 0).all()
    assert (out == 2).sum() == 24
    assert keep_largest_pieces(np.zeros((3, 3), np.int32)).sum() == 0


def test_keep_largest_pieces_uses_4_connectivity():
    label = np.zeros((4, 4), np.int32)
    label[0, 0] = label[1, 1] = label[2, 2] = 1  # diagonal pixels: three pieces of one pixel; the first one stays
    out = keep_largest_pieces(label)
    assert out.sum() == 1 and out[0, 0] == 1
