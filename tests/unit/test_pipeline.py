"""Pipeline behaviour beyond parity: input checks with their messages, videos per prompt, callbacks, the finite
check, the CLI writing a playable mp4. Uses tiny random checkpoints written by the reference."""

from __future__ import annotations

import logging
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from PIL import Image

from cogvideox import Pipeline, cli
from cogvideox.request import size_from_image
from cogvideox.transformer import Transformer
from tests.tiny_checkpoints import TEXT_LEN, reference_pipeline

pytest.importorskip("diffusers")
pytest.importorskip("google.protobuf", reason="transformers reads spiece.model through protobuf")

SMALL = {"height": 32, "width": 48, "num_frames": 9, "num_inference_steps": 2, "max_sequence_length": TEXT_LEN}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    roots = {}
    for variant in ("5b", "5b-i2v", "1.5"):
        roots[variant] = tmp_path_factory.mktemp(variant.replace(".", "_")) / "checkpoint"
        reference_pipeline(variant, roots[variant])
    return roots


@pytest.fixture(scope="module")
def t2v(checkpoints):
    pipe = Pipeline.from_pretrained(checkpoints["5b"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def i2v(checkpoints):
    pipe = Pipeline.from_pretrained(checkpoints["5b-i2v"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


IMAGE = Image.new("RGB", (48, 32), (200, 30, 30))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"num_frames": 10}, ValueError, r"num_frames=10: CogVideoX 1.0 needs 8N\+1 frames \(e.g. 49\)"),
        ({"height": 40}, ValueError, "height=40: must be a positive multiple of 16 pixels"),
        ({"width": 50}, ValueError, "width=50: must be a positive multiple of 16 pixels"),
        ({"prompt": []}, ValueError, "prompt is an empty list: give at least one prompt"),
        ({"prompt": ["ok", 3]}, TypeError, "prompt must hold strings, found int"),
        ({"image": IMAGE}, ValueError, "image= needs an image-to-video checkpoint"),
        ({"video": [IMAGE] * 9, "strength": 0.0}, ValueError, r"strength=0.0: must be in \(0, 1\]"),
        ({"video": [IMAGE] * 9, "strength": 1.5}, ValueError, r"strength=1.5: must be in \(0, 1\]"),
        ({"video": []}, ValueError, "video has no frames"),
        ({"video": [IMAGE] * 5, "num_frames": 9}, ValueError, "num_frames=9 but the video has only 5 frames"),
        ({"output_type": "mp4"}, ValueError, r"output_type='mp4': choose one of"),
        ({"num_videos_per_prompt": 0}, ValueError, "num_videos_per_prompt=0: must be a positive integer"),
        ({"negative_prompt": ["a", "b"]}, ValueError, "2 negative prompts for 1 prompts"),
        ({"latents": torch.zeros(1, 2, 4, 4, 6)}, ValueError, r"latents of shape \(1, 2, 4, 4, 6\): this call needs"),
    ],
)
def test_bad_input_is_refused_before_any_model_runs(t2v, kwargs, error, message, monkeypatch):
    def fail(*args, **kw):
        raise AssertionError("a model ran before the input was checked")

    if not {"negative_prompt", "latents"} & set(kwargs):  # these two are checked after text encoding
        monkeypatch.setattr(t2v.text_encoder, "forward", fail)
    monkeypatch.setattr(t2v.transformer, "forward", fail)
    call = {**SMALL, "prompt": "a red circle", **kwargs}
    with pytest.raises(error, match=message):
        t2v(**call)


def test_image_count_and_cpu_float16_are_checked_before_any_model(i2v, checkpoints, monkeypatch):
    def fail(*args, **kw):
        raise AssertionError("a model ran before the input was checked")

    monkeypatch.setattr(i2v.text_encoder, "forward", fail)
    with pytest.raises(ValueError, match="2 images for 1 prompts"):
        i2v("a red circle", image=[IMAGE, IMAGE], **SMALL)
    half = Pipeline.from_pretrained(checkpoints["5b"], dtype=torch.float16)
    monkeypatch.setattr(half.text_encoder, "forward", fail)
    with pytest.raises(ValueError, match="float16 on the CPU: the VAE cannot run in half precision there"):
        half("a red circle", **SMALL)


def test_image_to_video_checkpoints_need_an_image_and_a_size_they_cover(i2v):
    with pytest.raises(ValueError, match="this is an image-to-video checkpoint: pass image="):
        i2v("a red circle", **SMALL)
    with pytest.raises(ValueError, match="learned positions for 32x48 only"):
        i2v("a red circle", image=IMAGE, **{**SMALL, "height": 48})
    with pytest.raises(
        ValueError, match="max_sequence_length=226: this checkpoint.s learned positions cover exactly 16"
    ):
        i2v("a red circle", image=IMAGE, **{**SMALL, "max_sequence_length": 226})


def test_num_videos_per_prompt_gives_that_many_different_videos(t2v):
    out = t2v(["a red circle", "a blue square"], num_videos_per_prompt=2, generator=gen(), output_type="np", **SMALL)
    assert out.frames.shape == (4, 9, 32, 48, 3)
    assert not np.allclose(out.frames[0], out.frames[1])  # two videos of the same prompt differ
    assert not np.allclose(out.frames[2], out.frames[3])
    # Same seed, same call: the same four videos (the extra videos come from the generator, not from chance).
    again = t2v(["a red circle", "a blue square"], num_videos_per_prompt=2, generator=gen(), output_type="np", **SMALL)
    np.testing.assert_array_equal(again.frames, out.frames)


def test_callback_reads_replaces_latents_and_stops(t2v):
    seen = []

    def callback(pipe, step, timestep, tensors):
        assert isinstance(timestep, torch.Tensor) and timestep.ndim == 0  # diffusers passes a tensor too
        assert tensors["prompt_embeds"].shape[0] == 2  # the [negative; positive] batch the transformer sees
        seen.append((step, timestep, tuple(tensors["latents"].shape)))
        if step == 1:
            pipe.interrupt = True
        return {"latents": torch.zeros_like(tensors["latents"])}

    out = t2v("a red circle", generator=gen(), output_type="latent", callback_on_step_end=callback,
              callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
              **{**SMALL, "num_inference_steps": 5})  # fmt: skip
    assert [s for s, _, _ in seen] == [0, 1]  # stopped after the second step
    assert seen[0][2] == (1, 3, 4, 4, 6)
    assert torch.count_nonzero(out.frames) == 0  # the replaced latents are what came out


def test_nonfinite_latents_stop_with_the_step(t2v):
    def poison(pipe, step, timestep, tensors):
        return {"latents": torch.full_like(tensors["latents"], float("nan"))} if step == 1 else {}

    with pytest.raises(FloatingPointError, match=r"NaN or infinite at step 2 \(timestep \d+\).*bfloat16"):
        t2v("a red circle", generator=gen(), output_type="latent", callback_on_step_end=poison,
            **{**SMALL, "num_inference_steps": 4})  # fmt: skip


def test_trained_frame_counts_warn_when_only_the_vae_allows_them(t2v, caplog):
    with caplog.at_level(logging.WARNING):
        out = t2v("a red circle", generator=gen(), output_type="latent", **{**SMALL, "num_frames": 5})
    assert "CogVideoX 1.0 was trained on 8N+1 frames" in caplog.text
    assert out.frames.shape[1] == 2


def test_v15_pads_odd_latent_counts_for_video_to_video(checkpoints):
    pipe = Pipeline.from_pretrained(checkpoints["1.5"])
    pipe.set_progress_bar_config(disable=True)
    video = [Image.new("RGB", (48, 32), (i * 20, 0, 0)) for i in range(9)]  # 9 frames: 3 latent frames, odd
    out = pipe("a red circle", video=video, strength=0.5, generator=gen(), output_type="np",
               **{**SMALL, "num_frames": None})  # fmt: skip
    assert out.frames.shape == (1, 9, 32, 48, 3)


def test_v15_image_to_video_size_follows_the_image():
    assert size_from_image(1920, 1080) == (768, 1360)  # 16:9 landscape: 1365.3 -> 1360
    assert size_from_image(1080, 1920) == (1360, 768)
    assert size_from_image(1000, 1000) == (768, 768)
    assert size_from_image(1024, 768) == (768, 1024)


def test_cli_writes_a_playable_mp4(checkpoints, tmp_path, capsys):
    output = tmp_path / "out" / "video.mp4"
    code = cli.main(["generate", "--model", str(checkpoints["5b"]), "--prompt", "a red circle moves right",
                     "--output", str(output), "--num_inference_steps", "2", "--num-frames", "9", "--height", "32",
                     "--width", "48", "--max-sequence-length", str(TEXT_LEN), "--device", "cpu", "--quiet",
                     "--no-vae-tiling"])  # fmt: skip
    assert code == 0
    assert capsys.readouterr().out.strip() == str(output)
    reader = imageio.get_reader(str(output), format="FFMPEG")
    frames = [frame for frame in reader]
    assert reader.get_meta_data()["fps"] == 8
    reader.close()
    assert len(frames) == 9 and frames[0].shape == (32, 48, 3)
    assert [p.name for p in output.parent.iterdir()] == ["video.mp4"]  # no temporary file left behind


def test_cli_bad_input_is_one_line_and_exit_code_2(checkpoints, tmp_path, capsys):
    code = cli.main(["generate", "--model", str(checkpoints["5b"]), "--prompt", "x", "--num-frames", "50",
                     "--output", str(tmp_path / "x.mp4"), "--device", "cpu", "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("cogvideox: error: num_frames=50: CogVideoX 1.0 needs 8N+1")
    assert cli.main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x", "--quiet"]) == 2
    assert "is neither an existing folder nor a hub id" in capsys.readouterr().err


def test_hub_ids_download_only_what_the_pipeline_reads(checkpoints, monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(checkpoints["5b"])

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    pipe = Pipeline.from_pretrained("THUDM/CogVideoX-5b", revision="main", local_files_only=True)
    assert isinstance(pipe, Pipeline) and not pipe.image_to_video
    (repo_id, kwargs), *rest = calls
    assert repo_id == "THUDM/CogVideoX-5b" and not rest
    assert kwargs["revision"] == "main" and kwargs["local_files_only"] is True
    patterns = kwargs["allow_patterns"]
    assert "transformer/*.safetensors" in patterns and not any(p.endswith((".bin", ".pt")) for p in patterns)


def test_hub_ids_as_paths_and_tokens_reach_the_download(checkpoints, monkeypatch, tmp_path):
    """A hub id given as a pathlib.Path (no such local folder) is still a hub id, and ``token=`` reaches
    huggingface_hub for gated or private repositories; a component's own from_pretrained passes it too."""
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(checkpoints["5b"])

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)
    Pipeline.from_pretrained(Path("THUDM/CogVideoX-5b"), token="hf_secret")
    Transformer.from_pretrained(Path("THUDM/CogVideoX-5b"), token="hf_other")
    assert [(repo_id, kwargs["token"]) for repo_id, kwargs in calls] == [
        ("THUDM/CogVideoX-5b", "hf_secret"), ("THUDM/CogVideoX-5b", "hf_other"),
    ]  # fmt: skip


def test_float16_with_a_bfloat16_model_warns(checkpoints, caplog, monkeypatch):
    pipe = Pipeline.from_pretrained(checkpoints["5b"], dtype=torch.float16)
    pipe.set_progress_bar_config(disable=True)

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(pipe, "encode_prompt", stop)  # the warning comes before any model runs
    with caplog.at_level(logging.WARNING), pytest.raises(Stop):
        pipe("a red circle", output_type="latent", **SMALL)
    assert "float16 with a CogVideoX 5B / 1.5 model" in caplog.text and "use dtype=torch.bfloat16" in caplog.text


def test_cli_model_offload_on_the_cpu_gives_the_same_video(checkpoints, tmp_path):
    common = ["generate", "--model", str(checkpoints["5b"]), "--prompt", "a red circle", "--num-inference-steps", "2",
              "--num-frames", "9", "--height", "32", "--width", "48", "--max-sequence-length", str(TEXT_LEN),
              "--device", "cpu", "--quiet", "--no-vae-tiling"]  # fmt: skip
    assert cli.main([*common, "--output", str(tmp_path / "plain.gif")]) == 0
    assert cli.main([*common, "--output", str(tmp_path / "offload.gif"), "--offload", "model"]) == 0
    assert (tmp_path / "plain.gif").read_bytes() == (tmp_path / "offload.gif").read_bytes()
