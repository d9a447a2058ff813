"""Inline display (cogvideox/display.py): what a pipeline output and ``show`` give Jupyter, without IPython."""

from __future__ import annotations

import base64
import io
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cogvideox import show


def gifs(html: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(data))) for data in re.findall(r"image/gif;base64,([^\"]+)", html)]


@pytest.mark.parametrize("output_type", ["pil", "np", "pt"])
def test_pipeline_output_shows_each_video_with_its_prompt(demo_pipe, output_type):
    prompts = ["a red circle moves up", "a blue square moves to the left"]
    out = demo_pipe(prompts, output_type=output_type, num_inference_steps=4, num_videos_per_prompt=2)
    html = out._repr_html_()
    images = gifs(html)
    assert len(images) == 4 and all(image.n_frames == 9 and image.size == (32, 32) for image in images)
    assert html.count("<figcaption>a red circle moves up</figcaption>") == 2
    assert out.fps == 8 and out.prompts == [prompts[0], prompts[0], prompts[1], prompts[1]]


def test_latents_and_embeddings_only_outputs(demo_pipe):
    assert demo_pipe("a red circle moves up", output_type="latent", num_inference_steps=2)._repr_html_() is None
    embeds = demo_pipe.encode_text(["a red circle moves up"], max_sequence_length=12)
    out = demo_pipe(prompt_embeds=embeds, guidance_scale=1.0, output_type="np", num_inference_steps=2)
    assert out.prompts is None and "<figcaption>" not in out._repr_html_()


def test_show_any_frames_and_larger_videos_as_mp4():
    video = np.random.default_rng(0).random((5, 160, 192, 3), dtype=np.float32)
    html = str(show(video, fps=16, prompts="noise"))
    assert '<video controls autoplay loop muted playsinline width="192">' in html
    assert "data:video/mp4;base64," in html and "<figcaption>noise</figcaption>" in html
    assert (
        repr(show(torch.rand(2, 5, 3, 16, 16))) == "<2 video(s) at 8 fps: 5x16x16, 5x16x16 (frames x height x width)>"
    )
    frames = [Image.new("RGB", (16, 16), (255, 80 * i, 0)) for i in range(3)]  # distinct: a GIF merges repeats
    assert gifs(show(frames)._repr_html_())[0].n_frames == 3


def test_show_bad_input():
    video = np.zeros((3, 8, 8, 3), np.float32)
    with pytest.raises(ValueError, match="2 prompts for 1 videos: give one for all, or one each"):
        show(video, prompts=["a", "b"])
    with pytest.raises(ValueError, match="fps=0: must be a positive number"):
        show(video, fps=0)
    with pytest.raises(ValueError, match="nothing to show"):
        show([])


def test_no_ipython_import():
    code = "import sys, cogvideox.display, cogvideox.pipeline; print('IPython' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
