"""The first hour with the command line, as a new user would spend it: the official demo's option names, the
subcommand's usage on a typo, 0 never standing for "the default", a hub id without the network, the CLI's defaults
equal to Python's, the examples without arguments, and ``--help`` without torch."""

from __future__ import annotations

import logging
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import cogvideox
from cogvideox import Pipeline, cli, request
from cogvideox.loading import resolve_pretrained

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "a red circle moves to the right"
HUB_ID = "THUDM/CogVideoX-2b"


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a model fails the test: the errors below must come before minutes of loading."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model loaded before the arguments were checked")

    monkeypatch.setattr("cogvideox.pipeline.Pipeline.from_pretrained", refuse)


@pytest.fixture
def cli_warnings():
    """Warnings of cogvideox.cli, caught without pytest's logging plugin (the suite may run with -p no:logging)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("cogvideox.cli")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


# 1. Every option of the official inference/cli_demo.py, under its own name

CLI_DEMO_OPTIONS = (
    "--prompt", "--model_path", "--lora_path", "--lora_rank", "--output_path", "--num_inference_steps",
    "--num_frames", "--width", "--height", "--fps", "--guidance_scale", "--num_videos_per_prompt", "--generate_type",
    "--image_or_video_path", "--dtype", "--seed",
)  # fmt: skip
ALIASES = [
    ("--prompt", "a cat", "prompt", "a cat"),
    ("--model_path", "THUDM/CogVideoX-5b", "model", "THUDM/CogVideoX-5b"),
    ("--lora_path", "my_lora", "lora", ["my_lora"]),
    ("--lora_rank", "64", "lora_rank", 64),
    ("--output_path", "out.gif", "output", "out.gif"),
    ("--num_inference_steps", "30", "num_inference_steps", 30),
    ("--num_frames", "81", "num_frames", 81),
    ("--width", "1360", "width", 1360),
    ("--height", "768", "height", 768),
    ("--fps", "16", "fps", 16),
    ("--guidance_scale", "7.5", "guidance_scale", 7.5),
    ("--num_videos_per_prompt", "2", "num_videos_per_prompt", 2),
    ("--generate_type", "v2v", "generate_type", "v2v"),
    ("--image_or_video_path", "input.mp4", "input_path", "input.mp4"),
    ("--dtype", "float16", "dtype", "float16"),
    ("--seed", "7", "seed", 7),
]


def test_the_aliases_cover_every_cli_demo_option():
    assert [option for option, *_ in ALIASES] == list(CLI_DEMO_OPTIONS)


@pytest.mark.parametrize(("option", "value", "dest", "expected"), ALIASES)
def test_cli_demo_option_names_parse_to_our_options(option, value, dest, expected):
    prompt = [] if option == "--prompt" else ["--prompt", "p"]
    args = cli.build_parser().parse_args(["generate", *prompt, option, value])
    assert getattr(args, dest) == expected


def test_lora_path_is_our_lora_and_repeats():
    args = cli.build_parser().parse_args(["generate", "--prompt", "p", "--lora_path", "a", "--lora", "b"])
    assert args.lora == ["a", "b"] and args.lora_rank is None


@pytest.mark.parametrize(
    ("command", "usage"),
    [(["generate", "--prompt", "p"], "generate"), (["convert-sat", "in.pt", "out", "--config", "x"], "convert-sat")],
)
def test_an_unknown_option_prints_the_subcommands_usage(command, usage, capsys):
    with pytest.raises(SystemExit) as caught:
        cli.build_parser().parse_args([*command, "--bogus", "1"])
    err = capsys.readouterr().err
    assert caught.value.code == 2
    assert err.startswith(f"usage: cogvideox {usage} [-h] ")
    assert err.splitlines()[-1] == f"cogvideox {usage}: error: unrecognized arguments: --bogus 1"


# 2. No falsy value stands for "the default"

ZERO_OPTIONS = [
    ("--num-frames", "49"), ("--height", "480"), ("--width", "720"), ("--num-inference-steps", "50"),
    ("--num-videos-per-prompt", "1"), ("--fps", "8"), ("--lora-rank", "128"), ("--ulysses-degree", "2"),
]  # fmt: skip


@pytest.mark.parametrize(("option", "example"), ZERO_OPTIONS)
def test_zero_counts_and_sizes_are_refused_before_loading(option, example, capsys, no_loading):
    with pytest.raises(SystemExit) as caught:
        cli.main(["generate", "--prompt", "p", option, "0"])
    assert caught.value.code == 2
    names = f"{option}/--{option[2:].replace('-', '_')}" if "-" in option[2:] else option  # with its alias
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"cogvideox generate: error: argument {names}: 0 is not positive: give a whole number >= 1 (e.g. {example}), "
        "or leave the option out for the default"
    )


def resolve(pipe, **overrides):
    arguments = dict(
        image_to_video=pipe.image_to_video, prompt=PROMPT, negative_prompt=None, prompt_embeds=None,
        negative_prompt_embeds=None, image=None, video=None, strength=0.8, height=None, width=None, num_frames=None,
        guidance_scale=6.0, num_videos_per_prompt=1, latents=None, output_type="np", callback_tensors=("latents",),
        max_sequence_length=None,
    )  # fmt: skip
    return request.resolve(pipe.transformer.config, pipe.latent_codec, **{**arguments, **overrides})


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("num_frames", "num_frames=0: CogVideoX 1.0 needs 8N+1 frames (e.g. 49); the VAE needs at least 4k+1"),
        ("height", "height=0: must be a positive multiple of 8 pixels, e.g. 480 or 720"),
        ("width", "width=0: must be a positive multiple of 8 pixels, e.g. 480 or 720"),
        ("max_sequence_length", "max_sequence_length=0: must be an integer of at least 2"),
        ("num_videos_per_prompt", "num_videos_per_prompt=0: must be a positive integer"),
    ],
)
def test_python_zero_is_an_error_not_the_default(demo_pipe, name, message, monkeypatch):
    with pytest.raises(ValueError) as caught:
        resolve(demo_pipe, **{name: 0})
    assert str(caught.value) == message

    def refuse(*args, **kwargs):
        raise AssertionError("a model ran before the arguments were checked")

    monkeypatch.setattr(torch.nn.Module, "__call__", refuse)
    with pytest.raises(ValueError) as caught:
        demo_pipe(PROMPT, **{name: 0})
    assert str(caught.value) == message


def test_python_none_is_the_default(demo_pipe):
    req = resolve(demo_pipe)
    assert (req.num_frames, req.height, req.width, req.max_sequence_length) == (9, 32, 32, 12)


# 3. A hub id without the network

UNREACHABLE = (
    "'THUDM/CogVideoX-2b' was taken for a hub id because no folder of that name exists here ({cwd}), and the Hugging "
    "Face Hub could not be reached ({cause}): give the path of a local folder holding the model, or, if it was "
    "downloaded before, set HF_HUB_OFFLINE=1 to load it from the local hub cache without the network"
)
NOT_CACHED = (
    "'THUDM/CogVideoX-2b' was taken for a hub id because no folder of that name exists here ({cwd}), and it is not "
    "in the local hub cache while downloads are off ({reason}): give the path of a local folder holding the model, "
    "or download it once with the network on"
)


class ConnectError(Exception):
    """Named as httpx's, to stand for the transport error huggingface_hub wraps."""


def download_raising(monkeypatch, error: BaseException) -> list[dict]:
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append(kwargs)
        raise error

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    return calls


def wrapped(error: BaseException, cause: BaseException) -> BaseException:
    error.__cause__ = cause  # as ``raise error from cause`` leaves it
    return error


def test_no_network_says_hub_id_and_how_to_go_offline(tmp_path, monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.chdir(tmp_path)
    message = "Got: ConnectError: [Errno -2] Name or service not known\nAn error happened while trying to locate"
    cause = ConnectError("[Errno -2] Name or service not known")
    calls = download_raising(monkeypatch, wrapped(LocalEntryNotFoundError(message), cause))
    with pytest.raises(ConnectionError) as caught:
        resolve_pretrained(HUB_ID)
    expected = UNREACHABLE.format(cwd=tmp_path, cause="ConnectError: [Errno -2] Name or service not known")
    assert str(caught.value) == expected and caught.value.__cause__.__cause__ is cause and len(calls) == 1


def test_requests_connection_error_gets_the_same_message(tmp_path, monkeypatch):
    requests_exceptions = pytest.importorskip("requests.exceptions")
    monkeypatch.chdir(tmp_path)
    download_raising(monkeypatch, requests_exceptions.ConnectionError("Max retries exceeded"))
    with pytest.raises(ConnectionError) as caught:
        resolve_pretrained(HUB_ID)
    assert str(caught.value) == UNREACHABLE.format(cwd=tmp_path, cause="ConnectionError: Max retries exceeded")


def test_httpx_transport_error_is_recognised_once_httpx_is_loaded(tmp_path, monkeypatch):
    httpx = types.ModuleType("httpx")
    httpx.TransportError = type("TransportError", (Exception,), {})
    httpx.ConnectTimeout = type("ConnectTimeout", (httpx.TransportError,), {})
    monkeypatch.setitem(sys.modules, "httpx", httpx)
    monkeypatch.chdir(tmp_path)
    download_raising(monkeypatch, httpx.ConnectTimeout("timed out"))
    with pytest.raises(ConnectionError) as caught:
        resolve_pretrained(HUB_ID)
    assert str(caught.value) == UNREACHABLE.format(cwd=tmp_path, cause="ConnectTimeout: timed out")


@pytest.mark.parametrize("local_files_only", [False, True])
def test_offline_and_not_cached_says_so(tmp_path, monkeypatch, local_files_only):
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    monkeypatch.chdir(tmp_path)
    error = LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder")
    download_raising(monkeypatch, error if local_files_only else wrapped(error, OfflineModeIsEnabled("offline")))
    with pytest.raises(FileNotFoundError) as caught:
        resolve_pretrained(HUB_ID, local_files_only=local_files_only)
    reason = "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE=1"
    assert str(caught.value) == NOT_CACHED.format(cwd=tmp_path, reason=reason)


def test_other_hub_errors_pass_unchanged(tmp_path, monkeypatch):
    error = RuntimeError("401 Client Error: the repository is gated")
    download_raising(monkeypatch, error)
    with pytest.raises(RuntimeError) as caught:
        resolve_pretrained(HUB_ID)
    assert caught.value is error


def test_cli_without_network_is_one_clear_line(tmp_path, monkeypatch, capsys):
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.chdir(tmp_path)
    cause = ConnectError("[Errno -2] Name or service not known")
    download_raising(monkeypatch, wrapped(LocalEntryNotFoundError("Got: ConnectError: ..."), cause))
    assert cli.main(["generate", "--model", HUB_ID, "--prompt", "p", "--quiet"]) == 2
    expected = UNREACHABLE.format(cwd=tmp_path, cause="ConnectError: [Errno -2] Name or service not known")
    assert capsys.readouterr().err == f"cogvideox: error: {expected}\n"


# 4. The CLI's defaults are the pipeline's


def test_cli_defaults_are_the_pipelines():
    import inspect

    signature = inspect.signature(Pipeline.__call__).parameters
    assert cli.CALL_DEFAULTS == {name: signature[name].default for name in cli.CALL_DEFAULTS}
    args = cli.build_parser().parse_args(["generate", "--prompt", "p"])
    fixed = {k: v for k, v in cli.CALL_DEFAULTS.items() if k != "strength"}
    # The checkpoint-dependent ones (size, frames, prompt length) are not passed: the pipeline picks them.
    assert cli.call_options(args, video_to_video=False) == fixed
    assert cli.call_options(args, video_to_video=True) == cli.CALL_DEFAULTS
    assert all(signature[k].default is None for k in ("height", "width", "num_frames", "max_sequence_length"))
    assert args.seed == 42 and args.output == "output.mp4"


def test_options_given_are_passed_as_given_zero_guidance_included():
    argv = ["generate", "--prompt", "p", "--negative-prompt", "blur", "--num-frames", "9", "--height", "32",
            "--width", "48", "--num-inference-steps", "3", "--guidance-scale", "0", "--no-dynamic-cfg",
            "--num-videos-per-prompt", "2", "--max-sequence-length", "12", "--strength", "0.5"]  # fmt: skip
    args = cli.build_parser().parse_args(argv)
    expected = {
        "negative_prompt": "blur", "num_frames": 9, "height": 32, "width": 48, "num_inference_steps": 3,
        "guidance_scale": 0.0, "use_dynamic_cfg": False, "num_videos_per_prompt": 2, "max_sequence_length": 12,
    }  # fmt: skip
    assert cli.call_options(args, video_to_video=False) == expected
    assert cli.call_options(args, video_to_video=True) == {**expected, "strength": 0.5}
    assert cli.build_parser().parse_args(["generate", "--prompt", "p", "--dynamic-cfg"]).dynamic_cfg is True


def test_help_states_the_pipelines_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal's width
    for phrase in (
        "classifier-free guidance weight (default 6.0;",
        "sampler steps (default 50;",
        "default: the checkpoint's size (the demo: 32x32; CogVideoX 1.0: 480x720;",
        "default: the checkpoint's (the demo: 9; CogVideoX 1.0: 49; 1.5: 81;",
        "dynamic classifier-free guidance (default off, as in Python;",
        "noise seed (default 42,",
        "default: output.mp4 in the current folder",
    ):
        assert phrase in text


def test_cli_and_python_give_the_same_frames_with_only_a_prompt(demo_pipe, tmp_path, monkeypatch, capsys):
    written = []

    def record(frames, path, fps):
        written.append((frames, Path(path), fps))
        return Path(path)

    monkeypatch.setattr("cogvideox.io.save_video", record)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["generate", "--prompt", PROMPT, "--seed", "7", "--device", "cpu", "--quiet"]) == 0
    assert capsys.readouterr().out == "output.mp4\n"  # the default output, in the current folder, printed
    [(frames, path, fps)] = written
    expected = demo_pipe(PROMPT, generator=torch.Generator().manual_seed(7), output_type="np").frames[0]
    assert path == Path("output.mp4") and fps == 8
    assert frames.shape == (9, 32, 32, 3) and np.array_equal(frames, expected)


# LoRA rank: read from the file; --lora_rank only checked against it


def demo_lora(path: Path, rank: int) -> Path:
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for block in range(6):
        for target in ("to_q", "to_k", "to_v", "to_out.0"):
            key = f"transformer.transformer_blocks.{block}.attn1.{target}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, 128, generator=gen) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(128, rank, generator=gen) * 0.01
    save_file(tensors, str(path))
    return path


def test_lora_rank_that_differs_from_the_file_warns_once(tmp_path, cli_warnings):
    path = str(demo_lora(tmp_path / "lora.safetensors", rank=4))
    pipe = Pipeline.from_pretrained()
    names = cli._load_loras(pipe, [path], [])
    assert names == ["lora_0"] and cli.lora_ranks(pipe.transformer, "lora_0") == [4]
    cli._check_lora_rank(pipe.transformer, 4, names, [path])
    cli._check_lora_rank(pipe.transformer, None, names, [path])
    assert cli_warnings == []
    cli._check_lora_rank(pipe.transformer, 128, names, [path])
    assert [r.getMessage() for r in cli_warnings] == [
        f"--lora-rank 128 but {path} has rank 4: the file's rank was used (it is read from the file; the adapter's "
        "weight is --lora-scale)"
    ]


def test_lora_rank_without_lora_is_refused_before_loading(tmp_path, capsys, no_loading):
    assert cli.main(["generate", "--prompt", "p", "--lora_rank", "128", "--output", str(tmp_path / "o.mp4")]) == 2
    assert capsys.readouterr().err == (
        "cogvideox: error: --lora-rank needs --lora (or --lora_path): drop it, or give the LoRA file\n"
    )


# 5. Examples without arguments, and --help without torch


@pytest.mark.parametrize(
    ("script", "argv", "usage"),
    [
        ("text_to_video.py", [], "usage: python examples/text_to_video.py MODEL [PROMPT]  "),
        ("image_to_video.py", ["model"], "usage: python examples/image_to_video.py MODEL IMAGE [PROMPT]  "),
        ("video_to_video.py", [], "usage: python examples/video_to_video.py MODEL VIDEO [PROMPT] [STRENGTH]  "),
        ("video_to_video.py", ["m", "v", "p", "strong"], "usage: python examples/video_to_video.py MODEL VIDEO "),
    ],
)
def test_examples_without_their_arguments_print_usage_and_exit_2(script, argv, usage):
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script), *argv], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(usage) and done.stderr.count("\n") == 1


def python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_importing_the_cli_does_not_import_torch():
    assert python("import sys, cogvideox.cli; print('torch' in sys.modules)") == "False\n"


def test_help_exits_before_torch_is_imported():
    code = (
        "import sys\nfrom cogvideox import cli\ntry:\n    cli.main(['generate', '--help'])\nexcept SystemExit as e:\n"
        "    print(e.code, 'torch' in sys.modules, file=sys.stderr)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.stderr == "0 False\n" and "usage: cogvideox generate" in done.stdout


def test_public_names_import_as_before():
    names = ["Pipeline", "PipelineOutput", "load_image", "load_video", "save_video", "DDIMSampler", "DPMSampler",
             "T5Encoder", "T5Tokenizer", "Transformer", "VAE", "make_sampler", "set_attention_backend",
             "show"]  # fmt: skip
    assert cogvideox.__all__ == names and set(cogvideox._SOURCES) == set(names)
    assert python(f"from cogvideox import {', '.join(names)}; from cogvideox import *; print(Pipeline.__name__)") == (
        "Pipeline\n"
    )
    assert all(name in dir(cogvideox) for name in names)
    with pytest.raises(AttributeError, match="module 'cogvideox' has no attribute 'Pipelin'"):
        cogvideox.Pipelin  # noqa: B018


def test_the_mode_follows_the_file_type_and_the_checkpoint(tmp_path, capsys):
    from PIL import Image

    from cogvideox.cli import _generate_type, main

    assert _generate_type(False, None) == "t2v"
    assert _generate_type(False, "clip.mp4") == "v2v"
    assert _generate_type(True, "photo.JPG") == "i2v"
    with pytest.raises(ValueError, match="clip.mp4: this is an image-to-video checkpoint, which starts from an"):
        _generate_type(True, "clip.mp4")
    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(image)
    code = main(["generate", "--prompt", "a red circle moves up", "--image", str(image),
                 "--output", str(tmp_path / "out.mp4"), "--quiet"])  # fmt: skip
    assert code == 2
    assert "red.png is an image: image-to-video needs an I2V checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out.mp4").exists()
