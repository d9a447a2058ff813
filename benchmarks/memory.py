"""Where the memory plan's numbers come from, and what it chooses (cogvideox/memory_plan.py).

    python benchmarks/memory.py --part factors     # CPU, ~1 minute: the activation factors, live-tensor meter
    python benchmarks/memory.py --part table       # instant: the plan per published model and GPU size

``factors`` measures, with the live-tensor meter of ``_common.py`` (peak bytes of tensors created during the
forward; weights and inputs excluded), the peak of one forward of: the transformer (published widths, 1 and 2 of
its blocks, float32 and bfloat16) over ``B * N * D * bytes``; T5-XXL (one block) over ``B * L * d_model * bytes``;
the published VAE's encode over ``c0 * H * W * bytes`` (c0 = 128). The library's constants (TRANSFORMER_STEP_FACTOR,
TEXT_ENCODE_FACTOR, VAE_ENCODE_FACTOR_*) round these up. ``table`` prints the plan chosen at each model's default
size for 80, 40, 24, 16, 12 and 8 GiB free (the table of docs/performance.md; tests/unit/test_memory_plan.py holds
the same expectations). The GPU comparison of predicted and measured peaks per mode is ``benchmarks/e2e.py --device
cuda``. Appends to benchmarks/RESULTS.md, section "Memory plan", unless --no-results.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (  # noqa: E402
    LiveTensorBytes,
    append_result,
    command_line,
    fill_random_,
    machine,
    markdown_table,
    today,
)
from cogvideox.configs import T5Config, VAEConfig  # noqa: E402
from cogvideox.loading import build_on_meta  # noqa: E402
from cogvideox.memory_plan import GiB, default_call_size, plan_memory  # noqa: E402
from cogvideox.presets import T5_XXL, transformer_config  # noqa: E402
from cogvideox.text import T5Encoder  # noqa: E402
from cogvideox.transformer import Transformer  # noqa: E402
from cogvideox.vae import VAE  # noqa: E402

MODELS = {"CogVideoX-2b": torch.float16, "CogVideoX-5b": torch.bfloat16, "CogVideoX1.5-5B": torch.bfloat16}
FREE_GIB = (80, 40, 24, 16, 12, 8)


def _random(factory):
    return fill_random_(build_on_meta(factory).to_empty(device="cpu").eval(), seed=0)


def _peak(fn) -> int:
    meter = LiveTensorBytes()
    with torch.no_grad(), meter:
        fn()
    return meter.peak


def transformer_factors() -> list[list[str]]:
    rows = []
    for name in MODELS:
        for layers in (1, 2):
            config = dataclasses.replace(transformer_config(name), num_layers=layers)
            for dtype in (torch.float32, torch.bfloat16):
                model = _random(lambda config=config, dtype=dtype: Transformer(config, dtype=dtype))
                frames = 4
                latents = torch.randn(2, frames, config.in_channels, 16, 12, dtype=dtype)
                text = torch.randn(2, 226, config.text_embed_dim, dtype=dtype)
                peak = _peak(functools.partial(model, latents, text, torch.full((2,), 500.0)))
                tokens = frames // (config.patch_size_t or 1) * 8 * 6 + 226
                unit = 2 * tokens * config.inner_dim * dtype.itemsize
                rows.append([f"transformer {name}, {layers} block(s), {dtype}", f"B=2, N={tokens}",
                             f"{peak / 2**20:.1f}", f"{peak / unit:.2f}"])  # fmt: skip
    return rows


def text_factors() -> list[list[str]]:
    model = _random(lambda: T5Encoder(T5Config(**{**T5_XXL, "num_layers": 1})))
    rows = []
    for batch in (1, 2):
        ids = torch.randint(0, 32000, (batch, 226))
        peak = _peak(lambda ids=ids: model(ids))
        rows.append(["T5-XXL, 1 block, float32", f"B={batch}, L=226", f"{peak / 2**20:.1f}",
                     f"{peak / (batch * 226 * 4096 * 4):.2f}"])  # fmt: skip
    return rows


def vae_factors() -> list[list[str]]:
    vae = _random(lambda: VAE(VAEConfig()))
    rows = []
    for frames, height, width in [(1, 32, 32), (1, 64, 64), (9, 32, 32), (17, 32, 32), (49, 32, 32), (17, 64, 48)]:
        video = torch.rand(1, 3, frames, height, width) * 2 - 1
        peak = _peak(lambda video=video: vae.encode(video))
        rows.append(["VAE encode, float32", f"{frames}x{height}x{width}", f"{peak / 2**20:.1f}",
                     f"{peak / (128 * height * width * 4):.2f}"])  # fmt: skip
    return rows


def plan_table() -> tuple[list[str], list[list[str]]]:
    header = ["model (dtype, default size)", *[f"{free} GiB free" for free in FREE_GIB]]
    rows = []
    for name, dtype in MODELS.items():
        text_encoder = build_on_meta(lambda dtype=dtype: T5Encoder(T5Config(**T5_XXL), dtype=dtype))
        transformer = build_on_meta(lambda name=name, dtype=dtype: Transformer(transformer_config(name), dtype=dtype))
        vae = build_on_meta(lambda dtype=dtype: VAE(VAEConfig(), dtype=dtype))
        size = default_call_size(transformer.config, vae, image_to_video=False)
        cells = []
        for free in FREE_GIB:
            plan = plan_memory(text_encoder, transformer, vae, size, free * GiB)
            fits = "" if plan.fits else " (does not fit)"
            cells.append(f"{plan.mode}, VAE {plan.vae_decode}: {plan.peak / GiB:.1f}{fits}")
        rows.append([f"{name} ({str(dtype).removeprefix('torch.')}, {size.frames}x{size.height}x{size.width})",
                     *cells])  # fmt: skip
    return header, rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("factors", "table"), required=True)
    parser.add_argument("--no-results", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.part == "factors":
        header = ["forward", "size", "peak MiB", "factor"]
        table = markdown_table(header, transformer_factors() + text_factors() + vae_factors())
        summary = ("Peak live bytes of one forward (weights and inputs excluded) over the unit of each estimate: "
                   "B*N*D*bytes (transformer), B*L*d_model*bytes (T5), 128*H*W*bytes (VAE encode).")  # fmt: skip
    else:
        header, rows = plan_table()
        table = markdown_table(header, rows)
        summary = "Plan chosen by memory='auto' at each model's default size, one video, guided; GiB = estimated peak."
    print(f"\n{summary}\n\n{table}\n")
    if not args.no_results:
        device = torch.device("cpu")
        append_result(
            "Memory plan", f"### {today()}: {machine(device)}\n\n`{command_line()}`\n\n{summary}\n\n{table}\n"
        )


if __name__ == "__main__":
    main()
