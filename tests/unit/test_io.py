"""Video and image I/O: every accepted layout, the three formats, atomic writes, mode conversion."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cogvideox import load_image, load_video, save_video
from cogvideox.io import frames_to_uint8


def clip(frames=5, height=32, width=48):
    rng = np.random.default_rng(0)
    return rng.random((frames, height, width, 3), dtype=np.float32)


def test_written_files_get_the_usual_permissions(tmp_path):
    import os

    umask = os.umask(0)
    os.umask(umask)
    path = save_video(clip(), tmp_path / "video.mp4")
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_layouts_agree():
    floats = clip()
    expected = frames_to_uint8(floats)
    assert expected.dtype == np.uint8 and expected.shape == (5, 32, 48, 3)
    assert np.array_equal(frames_to_uint8(torch.from_numpy(floats).permute(0, 3, 1, 2)), expected)  # pt layout
    assert np.array_equal(frames_to_uint8([Image.fromarray(f) for f in expected]), expected)  # pil layout
    assert np.array_equal(frames_to_uint8(expected), expected)
    assert np.array_equal(frames_to_uint8(floats[None]), expected)  # a batch of one
    with pytest.raises(ValueError, match=r"for a pipeline result pass out.frames\[0\]"):
        frames_to_uint8(np.stack([floats, floats]))


@pytest.mark.parametrize("suffix", [".mp4", ".gif", ".webp"])
def test_round_trip(tmp_path, suffix):
    path = save_video(clip(), tmp_path / "sub" / f"video{suffix}", fps=8)
    assert path.is_file() and sorted(p.name for p in path.parent.iterdir()) == [path.name]
    frames = load_video(path)
    assert len(frames) == 5 and frames[0].size == (48, 32) and frames[0].mode == "RGB"


def test_odd_sizes_are_padded_for_h264(tmp_path):
    frames = load_video(save_video(clip(3, 33, 47), tmp_path / "odd.mp4"))
    assert frames[0].size == (48, 34)


def test_bad_output_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match=r"cannot write 'video.avi': use one of .mp4, .gif, .webp"):
        save_video(clip(), tmp_path / "video.avi")
    with pytest.raises(ValueError, match="fps=0: must be positive"):
        save_video(clip(), tmp_path / "video.mp4", fps=0)
    with pytest.raises(ValueError, match="no frames to save"):
        save_video([], tmp_path / "video.mp4")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = save_video(clip(), tmp_path / "video.gif")
    before = target.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("cogvideox.io._write_animated", broken)
    with pytest.raises(OSError, match="disk full"):
        save_video(clip(2), target)
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["video.gif"]


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK", "I;16", "1"])
def test_load_image_converts_every_mode_to_rgb(tmp_path, mode):
    image = Image.new(mode, (20, 10))
    path = tmp_path / ("image.tiff" if mode in ("CMYK", "I;16") else "image.png")
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (20, 10)
    with pytest.raises(FileNotFoundError, match="image .*missing.png not found"):
        load_image(tmp_path / "missing.png")


def test_atomic_path_gives_usual_permissions_even_to_private_writers(tmp_path):
    """safetensors' save_file (and mkstemp) make 0600 files; atomic_path hands over a file with the mode a plain
    open() would give, and leaves no temporary behind."""
    import os

    from safetensors.torch import save_file

    from cogvideox.atomic import atomic_path, usual_mode

    target = tmp_path / "w.safetensors"
    with atomic_path(target) as tmp:
        save_file({"x": torch.zeros(2)}, str(tmp))
    umask = os.umask(0)
    os.umask(umask)
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~umask) == oct(usual_mode(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "failed.bin") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]
