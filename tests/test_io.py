"""Readers that forgive real-world files, and atomic writes."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import tifffile
from PIL import Image

from nuclei_d2.utils.io import (
    ImageReadError,
    atomic_write,
    read_image_rgb,
    read_json,
    read_label_map,
    write_json_atomic,
    write_label_map,
)


def test_rgba_grey_16bit_and_palette(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    Image.fromarray(np.dstack([rgb, np.full((9, 7), 128, np.uint8)])).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_image_rgb(tmp_path / "rgba.png"), rgb)

    Image.fromarray(rgb[:, :, 0]).save(tmp_path / "grey.png")
    grey = read_image_rgb(tmp_path / "grey.png")
    assert grey.shape == (9, 7, 3) and (grey[:, :, 1] == rgb[:, :, 0]).all()

    tifffile.imwrite(tmp_path / "rgb16.tif", rgb.astype(np.uint16) * 257)
    np.testing.assert_array_equal(read_image_rgb(tmp_path / "rgb16.tif"), rgb)

    Image.fromarray(rgb).convert("P").save(tmp_path / "pal.png")
    assert read_image_rgb(tmp_path / "pal.png").shape == (9, 7, 3)


def test_corrupt_and_missing_images_name_the_file(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ImageReadError, match="broken.png: cannot read image"):
        read_image_rgb(tmp_path / "broken.png")
    with pytest.raises(FileNotFoundError, match="nothere.png"):
        read_image_rgb(tmp_path / "nothere.png")
    np.save(tmp_path / "five.npy", np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ImageReadError, match="five.npy: 5 channels"):
        read_image_rgb(tmp_path / "five.npy")


def test_label_maps(tmp_path):
    label = np.array([[0, 3], [70000, 3]], dtype=np.int64)
    write_label_map(tmp_path / "a.tif", label)
    np.testing.assert_array_equal(read_label_map(tmp_path / "a.tif"), label)
    with pytest.raises(ValueError, match="16-bit"):
        write_label_map(tmp_path / "a.png", label)
    write_label_map(tmp_path / "b.png", label.clip(0, 9))
    assert read_label_map(tmp_path / "b.png").tolist() == [[0, 3], [9, 3]]
    with pytest.raises(ImageReadError, match=r"b.png: label map is 2x2 but its image is 3x2"):
        read_label_map(tmp_path / "b.png", shape=(3, 2))
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ImageReadError, match="rgb.png: a label map must be single-channel"):
        read_label_map(tmp_path / "rgb.png")


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "out.json"
    write_json_atomic(target, {"ok": 1})

    def failing(tmp):
        tmp.write_text('{"half": ')
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, failing)
    assert target.read_text() == '{"ok": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temp file left behind


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="signal masks are POSIX only")
@pytest.mark.parametrize("other_thread", [False, True])
def test_atomic_write_a_signal_as_the_temp_file_is_created_leaves_nothing_behind(tmp_path, monkeypatch, other_thread):
    # SIGTERM arrives the instant the temporary file is created: its handler (raising SystemExit, as a CLI's does)
    # must find the cleanup in place, so neither a temporary file nor a changed target remains. With another thread
    # alive (torch's, a loader's) the kernel may hand the signal to it, and Python then runs the handler in this
    # thread at once, whatever this thread's mask holds back.
    import threading

    import nuclei_d2.utils.io as io_module

    target = tmp_path / "out.json"
    write_json_atomic(target, {"ok": 1})
    real_create = io_module._create_exclusive

    def create_then_signal(path):
        fd = real_create(path)
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # give another thread's delivery time to reach this one
            pass
        return fd

    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    stop = threading.Event()
    idle = threading.Thread(target=stop.wait, daemon=True)
    if other_thread:
        idle.start()
    previous = signal.signal(signal.SIGTERM, on_term)
    monkeypatch.setattr(io_module, "_create_exclusive", create_then_signal)
    try:
        with pytest.raises(SystemExit):
            write_json_atomic(target, {"ok": 2})
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop.set()
    assert target.read_text() == '{"ok": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the mask is restored


def test_read_json_every_failure_is_one_line_naming_the_file(tmp_path):
    (tmp_path / "ok.json").write_text('{"a": [1, 2]}')
    assert read_json(tmp_path / "ok.json") == {"a": [1, 2]}
    with pytest.raises(FileNotFoundError, match=r"^.*nope\.json: split file not found$"):
        read_json(tmp_path / "nope.json", "split file")
    with pytest.raises(ValueError, match=r"sub: is a folder, not a COCO JSON$"):
        (tmp_path / "sub").mkdir()
        read_json(tmp_path / "sub", "COCO JSON")
    (tmp_path / "bad.json").write_text('{"a": ')
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON \(Expecting value"):
        read_json(tmp_path / "bad.json")
    (tmp_path / "latin1.json").write_bytes(b'{"caf\xe9": 1}')
    with pytest.raises(ValueError, match=r"latin1\.json: not valid JSON \("):
        read_json(tmp_path / "latin1.json")


def test_read_json_raises_the_callers_error_types(tmp_path):
    class Mine(ValueError):
        pass

    with pytest.raises(Mine, match="metadata file not found"):
        read_json(tmp_path / "m.json", "metadata file", error=Mine, missing=Mine)
    (tmp_path / "m.json").write_text("[")
    with pytest.raises(Mine, match="not valid JSON"):
        read_json(tmp_path / "m.json", error=Mine)
