"""CogVideoX-Fun control checkpoints (alibaba-pai; transformer input = noise + control-video latents): the same
frames as diffusers' CogVideoXFunControlPipeline for the same seed (float32, CPU), and the control inputs checked
before any work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cogvideox import Pipeline
from cogvideox.loading import is_control
from tests.helpers import rel_err
from tests.tiny_checkpoints import TEXT_LEN, reference_pipeline

PROMPT = "a panda plays a guitar"


def control_frames(count: int = 9, height: int = 32, width: int = 48, seed: int = 0) -> list[Image.Image]:
    """A moving bright square on noise: something for the control latents to carry."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(count):
        pixels = (rng.random((height, width, 3)) * 60).astype(np.uint8)
        pixels[8:20, 2 + 3 * i : 14 + 3 * i] = 255
        frames.append(Image.fromarray(pixels))
    return frames


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("fun") / "control"
    return root, reference_pipeline("5b-control", root)


@pytest.mark.parametrize("guidance_scale", [6.0, 1.0])
def test_control_video_frames_equal_the_reference(checkpoint, guidance_scale):
    root, ref = checkpoint
    pipe = Pipeline.from_pretrained(root)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.control and not pipe.image_to_video and is_control(root)
    call = {"num_inference_steps": 3, "guidance_scale": guidance_scale, "output_type": "pt",
            "max_sequence_length": TEXT_LEN}  # fmt: skip
    frames = control_frames()
    ours = pipe(PROMPT, control_video=frames, generator=torch.Generator().manual_seed(0), **call).frames
    expected = ref(PROMPT, control_video=frames, height=32, width=48, generator=torch.Generator().manual_seed(0),
                   **call).frames  # fmt: skip
    assert ours.shape == expected.shape == (1, 9, 3, 32, 48)
    assert rel_err(ours, expected) < 1e-5
    # The control video matters: another one gives another video.
    other = pipe(PROMPT, control_video=control_frames(seed=1)[::-1], generator=torch.Generator().manual_seed(0),
                 **call).frames  # fmt: skip
    assert rel_err(other, ours) > 1e-3


def test_control_batches_and_other_samplers(checkpoint):
    """Where the reference stops (it forces one video per prompt and crashes with the DPM sampler), the control
    pipeline goes on: two videos per prompt equal two single calls with their generators; DPM runs."""
    root, _ = checkpoint
    pipe = Pipeline.from_pretrained(root)
    pipe.set_progress_bar_config(disable=True)
    call = {"num_inference_steps": 2, "output_type": "latent", "control_video": control_frames()}
    both = pipe(PROMPT, num_videos_per_prompt=2, generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
                **call).frames  # fmt: skip
    singles = [pipe(PROMPT, generator=torch.Generator().manual_seed(s), **call).frames for s in (0, 1)]
    assert rel_err(both, torch.cat(singles)) < 1e-5
    pipe.set_sampler("dpm")
    assert torch.isfinite(pipe(PROMPT, generator=torch.Generator().manual_seed(0), **call).frames).all()


def test_control_bad_input(checkpoint, tmp_path):
    root, _ = checkpoint
    pipe = Pipeline.from_pretrained(root)
    call = {"num_inference_steps": 1, "output_type": "latent"}
    with pytest.raises(ValueError, match="this is a CogVideoX-Fun control checkpoint: pass control_video="):
        pipe(PROMPT, **call)
    with pytest.raises(ValueError, match="control_video has 9 frames but num_frames=17: they must be equal"):
        pipe(PROMPT, control_video=control_frames(), num_frames=17, **call)
    with pytest.raises(ValueError, match=r"num_frames=8: CogVideoX 1.0 needs 8N\+1 frames"):
        pipe(PROMPT, control_video=control_frames(8), **call)
    with pytest.raises(ValueError, match=r"height=64 but the control_video frames are 48x32 \(width x height\)"):
        pipe(PROMPT, control_video=control_frames(), height=64, **call)
    mixed = control_frames()[:8] + control_frames(1, 32, 64)
    with pytest.raises(ValueError, match=r"control_video frames have different sizes \[\(48, 32\), \(64, 32\)\]"):
        pipe(PROMPT, control_video=mixed, **call)
    with pytest.raises(ValueError, match="take control_video=, not image= or video="):
        pipe(PROMPT, control_video=control_frames(), video=control_frames(), **call)
    reference_pipeline("5b", tmp_path / "t2v")
    with pytest.raises(ValueError, match="control_video= needs a CogVideoX-Fun control checkpoint .* this one is "
                                         "text-to-video"):  # fmt: skip
        Pipeline.from_pretrained(tmp_path / "t2v")(PROMPT, control_video=control_frames(), **call)
