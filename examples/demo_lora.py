"""Teach the bundled demo model a pair it never saw, with a LoRA: python examples/demo_lora.py [OUTPUT].

The demo model was trained without "blue ... moves down" (cogvideox.demo.data.HELD_OUT) and draws it moving up.
This script fine-tunes a rank-16 LoRA on its attention projections with clips of that pair mixed with the pairs it
already knows (so it does not forget them), on the CPU (71 s of training on a 2-core VM), then scores captions
before and after with cogvideox.demo.evaluate. The adapter is written to OUTPUT (default demo-lora/) and loads with
``pipe.load_lora(OUTPUT)`` or ``cogvideox generate --lora OUTPUT --prompt "a blue circle moves down"``.
"""

import sys
import time

import torch

from cogvideox import Pipeline
from cogvideox.demo import data
from cogvideox.demo.evaluate import describe
from cogvideox.training import DiffusionObjective, Trainer, TrainingBatch, TrainingConfig, encode_video, inject_lora

output = sys.argv[1] if len(sys.argv) > 1 else "demo-lora"
NEW_PAIR = ("blue", "down")


def score(pipe: Pipeline, motions: list[data.Motion], seeds=(0, 1, 2, 3)) -> str:
    """How many generated videos show the prompted colour and direction."""
    right = 0
    for seed in seeds:
        out = pipe([m.caption for m in motions], output_type="np", generator=torch.Generator().manual_seed(seed))
        right += sum(describe(f) == (m.colour, m.direction) for f, m in zip(out.frames, motions, strict=True))
    return f"{right}/{len(seeds) * len(motions)}"


def report(pipe: Pipeline, when: str) -> None:
    new = [m for m in data.all_motions() if (m.colour, m.direction) == NEW_PAIR]
    held = [m for m in data.all_motions() if m.held_out]
    print(f"{when}: new pair {score(pipe, new)}, all held-out pairs {score(pipe, held)}, "
          f"trained pairs {score(pipe, data.training_motions(), seeds=(0,))}")  # fmt: skip


pipe = Pipeline.from_pretrained()  # the bundled demo model
pipe.set_progress_bar_config(disable=True)
report(pipe, "before")

# 1. Data, encoded once: the new pair 16 times over, plus every pair the model knows, 4 random clips each.
gen = torch.Generator().manual_seed(0)
pool = [m for m in data.all_motions() if (m.colour, m.direction) == NEW_PAIR] * 16 + data.training_motions()
with torch.no_grad():
    clips = torch.stack([data.render(m, gen) for m in pool for _ in range(4)])  # [N, 3, 9, 32, 32]
    latents = torch.cat([encode_video(pipe.vae, part, generator=gen) for part in clips.split(64)])  # [N, 3, 8, 4, 4]
    text = pipe.encode_text([m.caption for m in pool for _ in range(4)])  # [N, 12, 64]
    null_text = pipe.encode_text([""])  # what a dropped caption becomes, as in the demo's own training

# 2. LoRA on to_q, to_k, to_v, to_out.0 of every block; everything else frozen.
inject_lora(pipe.transformer, rank=16, alpha=16)
config = TrainingConfig(learning_rate=1e-3, warmup_steps=20, gradient_checkpointing=False, caption_dropout=0.1)
trainer = Trainer(pipe.transformer, DiffusionObjective(pipe.sampler.config), config, null_text_embeds=null_text,
                  generator=torch.Generator().manual_seed(1))  # fmt: skip

# 3. 300 steps of 32 clips.
order = torch.Generator().manual_seed(2)
start = time.perf_counter()
for step in range(300):
    pick = torch.randint(len(latents), (32,), generator=order)
    result = trainer.step(TrainingBatch(latents[pick], text[pick]))
    if step % 100 == 0 or step == 299:
        print(f"step {step}: loss {result.loss:.4f} ({time.perf_counter() - start:.0f} s)")
print("saved", trainer.save_lora(output))

pipe.transformer.eval()
report(pipe, "after")
