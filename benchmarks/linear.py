"""CPU linear kernels: ``F.linear`` (MKL's sgemm for float32) against oneDNN's matrix product, which
``cogvideox.ops.linear.OneDNNLinear`` (what ``use_onednn_linear_`` makes of a model's layers) uses for float32
inference products of at least ``ONEDNN_MIN_MACS`` multiply-adds.

    python benchmarks/linear.py              # the real layer shapes of the 5B transformer and T5-XXL, ~1 minute
    python benchmarks/linear.py --repeats 9

Rows: the 5B's projections at the CPU step benchmark's 1028 rows (2 x 514 tokens), its adaLN and time-embedding
products (2 rows), T5-XXL's at 226 rows, and small products around the threshold. Each kernel is timed
alternately on the same tensors (median of ``--repeats`` after a warm-up call); the error is
max |oneDNN - F.linear| / max |F.linear|. No reference model is involved: this measures the kernel choice alone.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import append_result, command_line, machine, markdown_table, today  # noqa: E402
from cogvideox.ops.linear import ONEDNN_MIN_MACS, onednn_linear_available  # noqa: E402

# (what, rows, in, out)
SHAPES = [
    ("5B to_q / to_k / to_v / to_out", 1028, 3072, 3072),
    ("5B ff.net.0.proj", 1028, 3072, 12288),
    ("5B ff.net.2", 1028, 12288, 3072),
    ("5B fused to_qkv", 1028, 3072, 9216),
    ("5B norm1.linear (adaLN)", 2, 512, 18432),
    ("5B time_embedding.linear_2", 2, 512, 512),
    ("T5-XXL q / k / v / o", 226, 4096, 4096),
    ("T5-XXL wi_0 / wi_1", 226, 4096, 10240),
    ("T5-XXL wo", 226, 10240, 4096),
    ("small", 64, 256, 256),
    ("small", 128, 256, 512),
    ("small", 512, 64, 512),
]


def seconds(fn) -> float:
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-results", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    if not onednn_linear_available():
        raise SystemExit("this PyTorch build has no oneDNN linear (torch.ops.mkldnn._linear_pointwise)")

    rows = []
    gen = torch.Generator().manual_seed(0)
    for what, m, k, n in SHAPES:
        x = torch.randn(m, k, generator=gen)
        weight = torch.randn(n, k, generator=gen) / k**0.5
        bias = torch.randn(n, generator=gen)
        kernels = {
            "F.linear": partial(F.linear, x, weight, bias),
            "oneDNN": partial(torch.ops.mkldnn._linear_pointwise, x, weight, bias, "none", [], ""),
        }
        with torch.no_grad():
            expected = kernels["F.linear"]()  # the two calls here are the warm-up
            err = ((kernels["oneDNN"]() - expected).abs().max() / expected.abs().max()).item()
            times = {name: [] for name in kernels}
            for _ in range(args.repeats):  # alternate, so drift of a shared machine weighs on both alike
                for name, fn in kernels.items():
                    times[name].append(seconds(fn))
        med = {name: statistics.median(t) for name, t in times.items()}
        macs = m * k * n
        rows.append(
            [
                what,
                f"{m}x{k}x{n}",
                "oneDNN" if macs >= ONEDNN_MIN_MACS else "F.linear",
                f"{med['F.linear'] * 1e3:.2f}",
                f"{med['oneDNN'] * 1e3:.2f}",
                f"{med['oneDNN'] / med['F.linear']:.3f}",
                f"{err:.1e}",
            ]
        )
    header = ["layer", "rows x in x out", "used", "F.linear ms", "oneDNN ms", "ratio", "rel. error"]
    table = markdown_table(header, rows)
    facts = (
        f"float32, no autograd, median of {args.repeats} alternating calls after one warm-up; 'used' is the kernel "
        f"a OneDNNLinear layer picks (oneDNN from {ONEDNN_MIN_MACS:,} multiply-adds)"
    )
    print(f"\n{facts}\n\n{table}\n")
    if args.no_results:
        return
    entry = f"### {today()}: {machine(torch.device('cpu'))}\n\n`{command_line()}`\n\n{facts}.\n\n{table}\n"
    append_result("CPU linear kernels", entry)


if __name__ == "__main__":
    main()
