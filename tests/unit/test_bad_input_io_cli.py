"""Bad inputs to the pipeline's image= / video=, to save_video and to the command line: each one is a clear error
(the value, the rule, the fix) raised before any model runs or any file is written."""

from __future__ import annotations

import argparse
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cogvideox import cli, load_image, load_video, save_video
from cogvideox.atomic import atomic_path
from cogvideox.io import check_output_path
from cogvideox.processing import to_pil, video_frames_for_v2v

BYTES = b"\x89PNG\r\n\x1a\n"
URL = "https://example.com/cat.png"


def frames(count=3, height=8, width=8):
    return np.zeros((count, height, width, 3), dtype=np.uint8)


@pytest.fixture
def no_model_runs(monkeypatch):
    """Any module call fails the test: the errors below must come before the pipeline runs a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model ran before the input was checked")

    monkeypatch.setattr(torch.nn.Module, "__call__", refuse)


# 1. image= and video= inputs


def test_image_bytes_are_a_type_error_that_says_how_to_wrap_them():
    accepted = r"pass a file path, a PIL image, a numpy array .* or a torch tensor"
    with pytest.raises(TypeError, match=rf"image: got bytes \(8 bytes\); {accepted}.*PIL.Image.open\(io.BytesIO"):
        to_pil(BYTES)


@pytest.mark.parametrize("url", [URL, "http://example.com/cat.png"])
def test_image_url_is_refused_not_mangled(url):
    with pytest.raises(ValueError, match=rf"image '{url}' is a URL: URLs are not downloaded; download the file"):
        to_pil(url)


def test_image_of_another_type_names_it():
    with pytest.raises(TypeError, match=r"image: got int; pass a file path, a PIL image"):
        to_pil(3)


def test_missing_image_says_the_path_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"image .*missing.png not found: no such file; check the path"):
        to_pil(tmp_path / "missing.png")
    with pytest.raises(FileNotFoundError, match=r"relative to the current folder"):
        load_image("no-such-dir/missing.png")


def test_image_folder_is_not_a_file(tmp_path):
    with pytest.raises(IsADirectoryError, match=r"is a folder, not a file"):
        load_image(tmp_path)


def test_video_bytes_are_a_type_error_that_says_how_to_wrap_them():
    message = r"video: got bytes \(8 bytes\); pass a video file path, or a list of frames.*write them to a file"
    with pytest.raises(TypeError, match=message):
        video_frames_for_v2v(BYTES)
    with pytest.raises(TypeError, match=r"video: got bytes"):
        load_video(BYTES)


def test_video_url_is_refused():
    with pytest.raises(ValueError, match=r"video 'https://example.com/a.mp4' is a URL: URLs are not downloaded"):
        video_frames_for_v2v("https://example.com/a.mp4")


def test_missing_video_says_the_path_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"video .*missing.mp4 not found: no such file"):
        video_frames_for_v2v(tmp_path / "missing.mp4")


def test_bad_video_frames_and_types_are_refused_up_front():
    with pytest.raises(TypeError, match=r"video frame: got bytes"):
        video_frames_for_v2v([Image.new("RGB", (8, 8)), BYTES])
    with pytest.raises(TypeError, match=r"video: got int; pass a video file path"):
        video_frames_for_v2v(7)


def test_pipeline_refuses_bytes_and_urls_before_any_model_runs(tmp_path_factory, no_model_runs):
    pytest.importorskip("diffusers")
    pytest.importorskip("google.protobuf", reason="transformers reads spiece.model through protobuf")
    from cogvideox import Pipeline
    from tests.tiny_checkpoints import reference_pipeline

    root = tmp_path_factory.mktemp("i2v") / "checkpoint"
    reference_pipeline("5b-i2v", root)
    pipe = Pipeline.from_pretrained(root)
    with pytest.raises(TypeError, match=r"image: got bytes .*PIL.Image.open\(io.BytesIO\(data\)\)"):
        pipe("a cat", image=BYTES)
    with pytest.raises(ValueError, match=r"is a URL: URLs are not downloaded"):
        pipe("a cat", image=URL)


# 2. save_video and atomic_path


def test_save_video_into_a_file_as_folder_names_the_file(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"notes.txt is a file, not a folder; choose an output path"):
        save_video(frames(), tmp_path / "notes.txt" / "sub" / "out.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_save_video_onto_a_folder_is_refused(tmp_path):
    (tmp_path / "out.mp4").mkdir()
    with pytest.raises(IsADirectoryError, match=r"out.mp4: it is a folder; give a file name in it"):
        save_video(frames(), tmp_path / "out.mp4")


@pytest.mark.parametrize(("shape", "suffix"), [((3, 0, 8), ".mp4"), ((3, 8, 0), ".gif"), ((0, 8, 8), ".mp4")])
def test_empty_frames_are_refused_naming_their_shape(tmp_path, shape, suffix):
    message = rf"frames of shape \({shape[0]}, {shape[1]}, {shape[2]}, 3\) .*at least 1 frame of at least 1x1 pixels"
    with pytest.raises(ValueError, match=message) as caught:
        save_video(frames(*shape), tmp_path / f"empty{suffix}")
    assert ".empty." not in str(caught.value) and list(tmp_path.iterdir()) == []


def test_atomic_path_errors_never_name_the_temporary_file(tmp_path):
    target = tmp_path / "weights.bin"
    with pytest.raises(OSError, match=r"weights.bin") as caught, atomic_path(target) as tmp:
        raise OSError(5, "Input/output error", str(tmp))
    assert caught.value.filename == str(target) and ".weights." not in str(caught.value)
    with pytest.raises(RuntimeError, match=r"writing .*weights.bin failed: the writer created no file"):
        with atomic_path(target):
            pass  # a writer that failed quietly, as imageio does when ffmpeg refuses its input
    assert list(tmp_path.iterdir()) == []


# 3. cogvideox generate --output is checked before the model loads


def test_check_output_path_rules(tmp_path):
    assert check_output_path(tmp_path / "new" / "a.GIF") == tmp_path / "new" / "a.GIF"
    with pytest.raises(ValueError, match=r"cannot write 'a.avi': use one of .mp4, .gif, .webp"):
        check_output_path(tmp_path / "a.avi")


def test_cli_checks_output_before_loading_the_model(tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("the model loaded before --output was checked")

    monkeypatch.setattr("cogvideox.pipeline.Pipeline.from_pretrained", refuse)
    (tmp_path / "somefile.txt").write_text("x")
    code = cli.main(["generate", "--prompt", "p", "--output", str(tmp_path / "somefile.txt" / "out.mp4")])
    assert code == 2
    assert "somefile.txt is a file, not a folder" in capsys.readouterr().err
    assert cli.main(["generate", "--prompt", "p", "--output", str(tmp_path / "out.avi")]) == 2
    assert "use one of .mp4, .gif, .webp" in capsys.readouterr().err
    code = cli.main(["generate", "--prompt", "p", "--image", URL, "--output", str(tmp_path / "o.mp4")])
    assert code == 2
    assert f"--image-or-video-path '{URL}' is a URL" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["flash", "sage"])
def test_cli_attention_kernel_without_its_package_is_one_line_before_loading(tmp_path, monkeypatch, capsys, backend):
    def refuse(*args, **kwargs):
        raise AssertionError("the model loaded before --attention was checked")

    monkeypatch.setattr("cogvideox.pipeline.Pipeline.from_pretrained", refuse)
    for name in ("flash_attn", "flash_attn_interface", "sageattention"):  # absent, whatever this machine has
        monkeypatch.setitem(sys.modules, name, None)
    code = cli.main(["generate", "--prompt", "p", "--attention", backend, "--output", str(tmp_path / "o.mp4")])
    assert code == 2
    err = capsys.readouterr().err
    package = "pip install flash-attn" if backend == "flash" else "pip install sageattention"
    assert err.startswith(f"cogvideox: error: attention backend '{backend}' needs ") and package in err
    assert err.count("\n") == 1


# 4. convert-sat --config names


def test_convert_sat_config_near_miss_suggests_the_name(tmp_path, capsys):
    message = (
        r"--config 'CogVideoX-5B' is neither a known config name nor an existing file: did you mean 'CogVideoX-5b' "
        r"\(names are case-sensitive\)\? give a known name \(CogVideoX-2b, CogVideoX-5b,"
    )
    args = cli.build_parser().parse_args(["convert-sat", "in.pt", "out", "--config", "CogVideoX-5B"])
    with pytest.raises(ValueError, match=message):
        cli.convert_sat_command(args)
    code = cli.main(["convert-sat", str(tmp_path / "in.pt"), str(tmp_path / "out"), "--config", "cogvideox-9b"])
    err = capsys.readouterr().err
    assert code == 2 and "known name (CogVideoX-2b" in err and "did you mean" not in err
    assert not (tmp_path / "out").exists()


def test_convert_sat_config_that_is_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    args = cli.build_parser().parse_args(["convert-sat", "in.pt", "out", "--config", str(tmp_path / "config.json")])
    with pytest.raises(ValueError, match=r"config.json is not valid JSON .*the config.json given as --config"):
        cli.convert_sat_command(args)


# 5. numeric options


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--guidance-scale", "nan", r"'nan' is not a finite number"),
        ("--guidance-scale", "inf", r"'inf' is not a finite number"),
        ("--guidance-scale", "-1", r"-1 is negative: give a number >= 0"),
        ("--strength", "nan", r"'nan' is not a finite number"),
        ("--strength", "1.5", r"1.5 is outside \(0, 1\]"),
        ("--fps", "0", r"0 is not positive: give a whole number >= 1"),
        ("--lora-scale", "inf", r"'inf' is not a finite number"),
        ("--guidance-scale", "six", r"'six' is not a number"),
    ],
)
def test_non_finite_and_out_of_range_numbers_are_argparse_errors(option, value, message, capsys):
    with pytest.raises(SystemExit) as caught:
        cli.build_parser().parse_args(["generate", "--prompt", "p", option, value])
    assert caught.value.code == 2
    assert f"argument {option}" in (err := capsys.readouterr().err)
    assert re.search(message, err)


def test_number_types_raise_argument_type_errors():
    with pytest.raises(argparse.ArgumentTypeError, match=r"'nan' is not a finite number: give a plain number"):
        cli._non_negative_float("nan")
    assert cli._finite_float("-0.5") == -0.5  # a negative LoRA weight subtracts the adapter: allowed
    assert cli.build_parser().parse_args(["generate", "--prompt", "p"]).guidance_scale == 6.0


@pytest.mark.parametrize("option", ["--model", "--image", "--lora", "--device", "--lora_path", "--model_path"])
def test_empty_paths_and_names_are_argparse_errors_not_the_default(option, capsys):
    # An unset shell variable ("--model $MODEL") must not load the current folder or the demo model.
    with pytest.raises(SystemExit) as caught:
        cli.build_parser().parse_args(["generate", "--prompt", "p", option, ""])
    assert caught.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("cogvideox generate: error: argument ") and option in last
    assert last.endswith(": empty value: give a path or name, or leave the option out for the default")


@pytest.mark.parametrize(
    ("option", "example"),
    [("--num_frames", 49), ("--height", 480), ("--num_inference_steps", 50), ("--num_videos_per_prompt", 1)],
)
def test_negative_counts_are_argparse_errors_under_the_official_names(option, example, capsys):
    with pytest.raises(SystemExit) as caught:
        cli.build_parser().parse_args(["generate", "--prompt", "p", option, "-8"])
    assert caught.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.endswith(f": -8 is not positive: give a whole number >= 1 (e.g. {example}), or leave the option out "
                         "for the default")  # fmt: skip
