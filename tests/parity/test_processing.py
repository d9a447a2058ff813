"""Input and output pixels equal diffusers' VideoProcessor for every input kind the pipelines accept."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cogvideox.processing import image_to_tensor, postprocess_video, to_pil, video_to_tensor

diffusers = pytest.importorskip("diffusers")
from diffusers.video_processor import VideoProcessor  # noqa: E402

PROCESSOR = VideoProcessor(vae_scale_factor=8)
RNG = np.random.default_rng(0)
PIL_IMAGE = Image.fromarray(RNG.integers(0, 256, (30, 40, 3), dtype=np.uint8))
FLOAT_TENSOR = torch.from_numpy(RNG.random((3, 30, 40), dtype=np.float32))


@pytest.mark.parametrize(
    "image",
    [PIL_IMAGE, FLOAT_TENSOR, FLOAT_TENSOR * 2 - 1, FLOAT_TENSOR.permute(1, 2, 0).numpy()],
    ids=["pil", "float tensor [0, 1]", "float tensor [-1, 1]", "float array"],
)
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_image_preprocessing_matches(image):
    expected = PROCESSOR.preprocess(image, height=32, width=48)[0]
    assert torch.equal(image_to_tensor(image, 32, 48), expected)


def test_video_preprocessing_and_postprocessing_match():
    frames = [PIL_IMAGE, PIL_IMAGE.rotate(15)]
    assert torch.equal(video_to_tensor(frames, 32, 48), PROCESSOR.preprocess_video(frames, height=32, width=48)[0])
    video = torch.rand(2, 3, 5, 16, 24) * 2.4 - 1.2
    for output_type in ("np", "pt"):
        expected = PROCESSOR.postprocess_video(video, output_type=output_type)
        np.testing.assert_array_equal(np.asarray(postprocess_video(video, output_type)), np.asarray(expected))


def test_uint8_tensors_keep_their_values():
    image = torch.full((3, 8, 8), 100, dtype=torch.uint8)
    assert np.asarray(to_pil(image))[0, 0].tolist() == [100, 100, 100]
