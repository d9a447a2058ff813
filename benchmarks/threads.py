"""One intra-op thread or all of them: where the pipeline's thread rule (cogvideox/threads.py) comes from.

    python benchmarks/threads.py            # CPU only; about 4 minutes on 2 cores

Part 1: the bundled demo model, one 50-step call (and the README's first command, ``cogvideox generate`` in a
fresh process), with 1 thread and with every thread, on an idle machine and with every core kept busy by a
spinning process (what a laptop running other work, or a CI runner, looks like). Part 2: one guided transformer
pass of random models from the demo's size up to the 5B's width, 1 thread against every thread, idle: the
crossover in FLOPs per pass is where the rule switches.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import append_result, call_times, command_line, machine, markdown_table, today  # noqa: E402
from cogvideox import Pipeline, Transformer  # noqa: E402
from cogvideox.configs import TransformerConfig  # noqa: E402
from cogvideox.threads import pass_flops  # noqa: E402


def spin() -> None:
    while True:
        pass


class Busy:
    """Every core kept busy by a spinning process while the block runs."""

    def __enter__(self):
        self.procs = [multiprocessing.Process(target=spin, daemon=True) for _ in range(os.cpu_count() or 1)]
        for proc in self.procs:
            proc.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.join()


def median_time(fn, repeats: int) -> tuple[float, float, float]:
    times = call_times(fn, repeats)
    return statistics.median(times), min(times), max(times)


def demo_rows() -> list[list[str]]:
    pipe = Pipeline.from_pretrained()
    pipe.set_progress_bar_config(disable=True)
    every = torch.get_num_threads()
    rows = []
    for load in ("idle", "busy"):
        for threads in (1, every):
            pipe.cpu_threads = threads

            def call():
                pipe("a red circle moves to the right", generator=torch.Generator().manual_seed(0), output_type="np")

            def cli(threads=threads):
                env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
                cmd = [sys.executable, "-m", "cogvideox", "generate", "--prompt", "a red circle moves to the right",
                       "--output", "/tmp/threads-bench.mp4", "--quiet"]  # fmt: skip
                subprocess.run(cmd, env=env, check=True, capture_output=True)

            if load == "busy":
                with Busy():
                    t = median_time(call, 5)
                    c = median_time(cli, 2)
            else:
                t = median_time(call, 5)
                c = median_time(cli, 2)
            rows.append(
                [load, str(threads), f"{t[0]:.2f} ({t[1]:.2f}-{t[2]:.2f})", f"{c[0]:.1f} ({c[1]:.1f}-{c[2]:.1f})"]
            )
            print(rows[-1], flush=True)
    pipe.cpu_threads = None
    return rows


def pass_rows() -> list[list[str]]:
    every = torch.get_num_threads()
    rows = []
    # (width, layers, video tokens): the demo; small research sizes; the 5B's width
    for width, layers, video in ((128, 6, 48), (256, 4, 96), (512, 4, 192), (1024, 2, 288), (3072, 1, 288)):
        heads = width // 64 if width >= 64 else 1
        config = TransformerConfig(
            num_attention_heads=heads, attention_head_dim=width // heads, num_layers=layers, text_embed_dim=64,
            time_embed_dim=128, in_channels=8, out_channels=8, sample_height=4, sample_width=video // 12,
            sample_frames=9, patch_size=1, max_text_seq_length=12, use_rotary_positional_embeddings=True,
        )  # fmt: skip
        model = Transformer(config).eval()
        latents = torch.randn(2, 3, 8, 4, video // 12)
        text = torch.randn(2, 12, 64)
        t = torch.tensor([500, 500])
        flops = pass_flops(width, layers, video + 12, 2)
        times = {}
        for threads in (1, every):
            torch.set_num_threads(threads)
            with torch.no_grad():
                times[threads] = median_time(lambda m=model, x=latents, y=text, s=t: m(x, y, s), 5)[0]
        torch.set_num_threads(every)
        label = f"{width} x {layers} layers, {video + 12} tokens"
        one, all_ = times[1], times[every]
        rows.append([label, f"{flops / 1e9:.2f}", f"{1e3 * one:.1f}", f"{1e3 * all_:.1f}", f"{one / all_:.2f}"])
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    every = torch.get_num_threads()
    demo = markdown_table(
        ["machine", "threads", "demo call, s (min-max)", "`cogvideox generate` (OMP_NUM_THREADS=threads), s"],
        demo_rows(),
    )
    passes = markdown_table(
        ["model (batch 2)", "GFLOP / pass", "1 thread, ms", f"{every} threads, ms", "1 thread / all"], pass_rows()
    )
    text = (
        f"{today()} · `{command_line()}` · {machine(torch.device('cpu'))}\n\n"
        f"Demo model, 50 steps, guidance 6, one video (busy: {os.cpu_count()} spinning processes):\n\n{demo}\n\n"
        f"One guided transformer pass, random weights, idle:\n\n{passes}"
    )
    print(text)
    append_result("Threads", text)


if __name__ == "__main__":
    main()
