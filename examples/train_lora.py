"""LoRA fine-tuning: python examples/train_lora.py MODEL DATA OUTPUT [STEPS].

MODEL is a pipeline folder or hub id (e.g. THUDM/CogVideoX-5b, or an I2V model: the first frame of each clip
becomes its image). DATA holds ``prompts.txt`` and ``videos.txt`` (one line per clip, video paths relative to
DATA), the layout of CogVideo's ``finetune/``. OUTPUT receives ``pytorch_lora_weights.safetensors``, loadable with
``pipe.load_lora(OUTPUT)``. Multi-GPU: ``torchrun --nproc_per_node=N examples/train_lora.py ...`` (each process
takes every N-th clip; gradients are averaged by DDP).

Clips are resized to the model's training size (``request.default_size``: 480x720 for 1.0, 768x1360 for 1.5) and
cut to its frame count (49, or 81 for 1.5; use fewer with FRAMES=17 in the environment for a quick try). Latents
and prompt embeddings are computed once, then the text encoder leaves the GPU. See docs/training.md.
"""

import logging
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from cogvideox import Pipeline, load_video
from cogvideox.processing import video_to_tensor
from cogvideox.request import default_size
from cogvideox.training import (
    DiffusionObjective,
    Trainer,
    TrainingBatch,
    TrainingConfig,
    encode_video,
    inject_lora,
    pad_to_temporal_patch,
)

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
model, data, output = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
steps = int(sys.argv[4]) if len(sys.argv) > 4 else 1000

# torchrun sets these; a plain `python` run is one process.
if "LOCAL_RANK" in os.environ:
    if torch.cuda.is_available():  # NCCL collectives (the generator states in save_state) use the current device
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
local_rank = int(os.environ.get("LOCAL_RANK", 0))
device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

pipe = Pipeline.from_pretrained(model, dtype=dtype, device=device, text_encoder_offload=False)
config = pipe.transformer.config
frames = int(os.environ.get("FRAMES", config.sample_frames))
height, width = default_size(config, spatial=pipe.vae.spatial_compression)  # 480x720 (1.0), 768x1360 (1.5)

# 1. Encode this process's share of the data once: latents [1, F', C, h, w], prompt embeddings [1, 226, 4096].
prompts = (data / "prompts.txt").read_text().splitlines()
videos = (data / "videos.txt").read_text().splitlines()
encoded = []
generator = torch.Generator().manual_seed(rank)
with torch.no_grad():
    for prompt, video_path in list(zip(prompts, videos, strict=True))[rank::world]:
        pixels = video_to_tensor(load_video(data / video_path)[:frames], height, width)[None].to(device, dtype)
        latents = pad_to_temporal_patch(encode_video(pipe.vae, pixels, generator=generator), config.patch_size_t)
        encoded.append((latents.float(), pipe.encode_text([prompt]), pixels[:, :, 0]))
pipe.text_encoder.to("cpu")  # not needed for training

# 2. LoRA on the attention projections (official: rank 128, alpha 64), float32 parameters on a bf16 model.
inject_lora(pipe.transformer, rank=128, alpha=64)
image_to_video = config.in_channels == 2 * config.output_channels
trainer = Trainer(pipe.transformer, DiffusionObjective(pipe.sampler.config), TrainingConfig(learning_rate=1e-4),
                  vae=pipe.vae if image_to_video else None)  # fmt: skip


def batches():
    order = torch.Generator().manual_seed(1000 + rank)
    while True:
        for index in torch.randperm(len(encoded), generator=order).tolist():
            latents, text, first_frame = encoded[index]
            yield TrainingBatch(latents, text, images=first_frame if image_to_video else None)


def save_every(step: int, result) -> None:
    if step % 200 == 0 or step == steps:
        trainer.save_lora(output / f"checkpoint-{step}")


trainer.fit(batches(), steps, callback=save_every)
path = trainer.save_lora(output)
if rank == 0:
    print(path)
if dist.is_initialized():
    dist.destroy_process_group()
