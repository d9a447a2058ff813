"""DDIM inversion on the demo model: reconstruction and editing (docs/editing.md).

    python benchmarks/inversion.py                 # CPU, ~3 minutes

Reconstruction: 10 videos generated from 10 training captions (seeds 0-9, 50 DDIM steps, guidance 6, the demo's
defaults) are inverted with their own prompt and regenerated from the inverted latents with the same prompt and
steps. PSNR (frames in [0, 1]) against the generated video, and against that video after a VAE encode-decode
round trip (the inversion starts from the encoded latents, so that round trip bounds what any inversion can give
back); "latent error": relative L2 distance of the regenerated latents to the encoded ones.
Editing: each source video is inverted without guidance and regenerated with its caption's colour swapped
("a red circle moves to the right" -> "a blue circle moves to the right") at guidance 1 and 6;
``cogvideox.demo.evaluate.describe`` reads the colour and the direction of the edit and of the source.
Appends to benchmarks/RESULTS.md, section "Inversion", unless --no-results.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import append_result, command_line, machine, markdown_table, today  # noqa: E402
from cogvideox import Pipeline  # noqa: E402
from cogvideox.demo import data  # noqa: E402
from cogvideox.demo.evaluate import describe  # noqa: E402
from cogvideox.processing import postprocess_video, video_to_tensor  # noqa: E402

# (inversion guidance, regeneration guidance, fixed-point iterations)
SETTINGS = [(1.0, 1.0, 0), (1.0, 1.0, 3), (1.0, 1.0, 10), (6.0, 6.0, 0), (6.0, 6.0, 3), (1.0, 6.0, 0)]
SWAP = {"red": "blue", "green": "yellow", "blue": "red", "yellow": "green", "white": "red"}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a - b) ** 2)))


def sources(count: int) -> list[data.Motion]:
    """``count`` training motions spread over colours, shapes and directions."""
    motions = data.training_motions()
    return [motions[(i * 7) % len(motions)] for i in range(count)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=10)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--no-results", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    pipe = Pipeline.from_pretrained()
    pipe.set_progress_bar_config(disable=True)
    steps = args.steps
    rows: dict[tuple, list[tuple[float, float, float]]] = {s: [] for s in SETTINGS}
    edits: dict[float, list[tuple[bool, bool]]] = {1.0: [], 6.0: []}
    seconds: dict[int, list[float]] = {}
    for seed, motion in enumerate(sources(args.videos)):
        original = pipe(motion.caption, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                        output_type="np").frames[0]  # fmt: skip
        pixels = video_to_tensor(list(original), *original.shape[1:3])[None]
        clean = pipe.latent_codec.encode_video(pixels, mode=True)
        round_trip = postprocess_video(pipe.decode_latents(clean), "np")[0]
        for setting in SETTINGS:
            w_invert, w_regen, iterations = setting
            start = time.perf_counter()
            inverted = pipe.invert(list(original), motion.caption, num_inference_steps=steps, guidance_scale=w_invert,
                                   fixed_point_iterations=iterations)  # fmt: skip
            seconds.setdefault(iterations, []).append(time.perf_counter() - start)
            regen = pipe(motion.caption, latents=inverted, num_inference_steps=steps, guidance_scale=w_regen,
                         output_type="latent").frames  # fmt: skip
            error = float((regen - clean).norm() / clean.norm())
            video = postprocess_video(pipe.decode_latents(regen), "np")[0]
            rows[setting].append((psnr(video, original), psnr(video, round_trip), error))
        inverted = pipe.invert(list(original), motion.caption, num_inference_steps=steps)
        source_colour, source_direction = describe(original)
        target = data.Motion(SWAP[motion.colour], motion.shape, motion.direction)
        for w in edits:
            edited = pipe(target.caption, latents=inverted, num_inference_steps=steps, guidance_scale=w,
                          output_type="np").frames[0]  # fmt: skip
            colour, direction = describe(edited)
            edits[w].append((colour == target.colour, direction == source_direction and direction is not None))
        print(f"{motion.caption}: source read as {source_colour}, {source_direction}", flush=True)

    header = ["inversion guidance", "regeneration guidance", "fixed-point iterations",
              "PSNR vs generated dB (mean, min)", "PSNR vs VAE round trip dB (mean, min)",
              "latent error (mean)"]  # fmt: skip
    table_rows = []
    for (w_invert, w_regen, iterations), values in rows.items():
        vs_original, vs_round_trip, errors = zip(*values, strict=True)
        table_rows.append([f"{w_invert:g}", f"{w_regen:g}", str(iterations),
                           f"{statistics.mean(vs_original):.2f}, {min(vs_original):.2f}",
                           f"{statistics.mean(vs_round_trip):.2f}, {min(vs_round_trip):.2f}",
                           f"{statistics.mean(errors):.2e}"])  # fmt: skip
    table = markdown_table(header, table_rows)
    edit_header = ["regeneration guidance", "new colour read", "source direction kept", "both"]
    edit_rows = [[f"{w:g}", f"{sum(c for c, _ in v)}/{len(v)}", f"{sum(d for _, d in v)}/{len(v)}",
                  f"{sum(c and d for c, d in v)}/{len(v)}"] for w, v in edits.items()]  # fmt: skip
    edit_table = markdown_table(edit_header, edit_rows)
    timing = ", ".join(f"{k} iterations {statistics.median(v):.2f} s" for k, v in sorted(seconds.items()))
    summary = (f"Demo model, {args.videos} videos (9x32x32), {steps} DDIM steps, originals at guidance 6. Median "
               f"inversion time: {timing}.")  # fmt: skip
    editing = f"Editing (colour swapped in the prompt, inverted without guidance):\n\n{edit_table}"
    print(f"\n{summary}\n\n{table}\n\n{editing}\n")
    if not args.no_results:
        heading = f"### {today()}: {machine(torch.device('cpu'))}"
        append_result("Inversion", f"{heading}\n\n`{command_line()}`\n\n{summary}\n\n{table}\n\n{editing}\n")


if __name__ == "__main__":
    main()
