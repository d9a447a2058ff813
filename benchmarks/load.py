"""Loading a transformer checkpoint of real shapes: time and peak host memory, ours against the reference.

    python benchmarks/load.py --model CogVideoX-2b                  # writes ~3.4 GB of random bf16 shards first
    python benchmarks/load.py --model CogVideoX-5b --device cuda --folder /data/ckpt-5b
    python benchmarks/load.py --model CogVideoX-5b --folder /tmp/ckpt-5b --write-only   # only write the folder
    python benchmarks/load.py --tiny --no-results                   # CPU smoke test: a few MB

The checkpoint (random weights, the published keys and shapes, sharded with an index as the hub's are) is written
once to ``--folder`` (kept and reused: benchmarks/gpu.sh writes it in the background while the GPU tests run) or a
temporary folder (deleted). It is written into ``FOLDER.partial`` and renamed when complete, so a folder with a
``config.json`` is always whole; the values are a few million random numbers tiled over every tensor (what is
timed is moving bytes, not their values), which makes writing as fast as the disk. Its files are read once before
timing, so every load finds them in the page cache. Each load runs in a fresh subprocess (imports done before the
clock starts), alternating ours and the reference ``--repeats`` times:

- ours: ``Transformer.from_pretrained(folder, dtype=, device=)``;
- reference: ``CogVideoXTransformer3DModel.from_pretrained(folder, torch_dtype=)`` then ``.to(device)``; with
  accelerate installed it builds on the meta device (``low_cpu_mem_usage``), without it it initialises random
  weights first. The table says which.

When the file's dtype is the one asked for, both loaders may return weights still backed by the memory-mapped
files (nothing read yet), so after ``from_pretrained`` returns, the child reads one value per page of every weight
("first read") and the table gives both times. Peak host memory is the child's peak resident set (VmHWM, reset
after the imports) up to the end of that read, minus its resident set before the load: what loading adds, weights
included (mapped file pages count while mapped). On a GPU the table also gives the device's peak, allocated and
reserved. ``--json PATH`` writes the headline figures (benchmarks/gpu.sh builds its summary from them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import append_result, command_line, machine, markdown_table, today, write_json  # noqa: E402
from cogvideox.presets import TRANSFORMER_CONFIGS  # noqa: E402

logger = logging.getLogger("load")
CONFIG_CLASS = "CogVideoXTransformer3DModel"
WEIGHTS = "diffusion_pytorch_model"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="CogVideoX-2b", choices=sorted(TRANSFORMER_CONFIGS))
    parser.add_argument("--device", default="cpu", help="where the weights go: cpu or cuda[:n]")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--shard-size", default="2GB", help="largest shard written, e.g. 2GB, 5GB, 500MB")
    parser.add_argument("--folder", type=Path, help="checkpoint folder: reused if it has one, else written and kept")
    parser.add_argument("--repeats", type=int, default=2, help="loads per side (alternating)")
    parser.add_argument("--tiny", action="store_true", help="tiny widths, 2 blocks (smoke test of the script)")
    parser.add_argument("--write-only", action="store_true", help="write the checkpoint to --folder and stop")
    parser.add_argument("--no-results", action="store_true", help="do not append to benchmarks/RESULTS.md")
    parser.add_argument("--json", metavar="PATH", help="also write the headline figures to this JSON file")
    parser.add_argument("--child", choices=["ours", "reference"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.write_only and args.folder is None:
        parser.error("--write-only needs --folder")
    return args


def model_config(model_name: str, tiny: bool):
    """The published transformer config, or (``tiny``) the same with tiny widths and 2 blocks."""
    from cogvideox.presets import transformer_config

    config = transformer_config(model_name)
    if tiny:
        config = dataclasses.replace(
            config, num_layers=2, num_attention_heads=2, attention_head_dim=16, text_embed_dim=32, time_embed_dim=16
        )
    return config


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", text.upper())
    if match is None:
        raise SystemExit(f"--shard-size {text!r}: write a size like 2GB, 500MB or 40KB")
    return int(float(match[1]) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[match[2]])


# ---------------------------------------------------------------------------------------------- the checkpoint


@torch.no_grad()
def write_checkpoint(config, folder: Path, dtype: torch.dtype, shard_bytes: int) -> None:
    """config.json, shards ``diffusion_pytorch_model-0000k-of-0000n.safetensors`` and their index, holding random
    weights with the published keys and shapes. Holds one shard in memory at a time. Written into
    ``folder.partial`` and renamed to ``folder`` at the end."""
    from safetensors.torch import save_file

    from cogvideox import Transformer
    from cogvideox.configs import config_to_dict

    final, folder = folder, folder.with_name(folder.name + ".partial")
    shutil.rmtree(folder, ignore_errors=True)
    with torch.device("meta"):
        shapes = {k: (v.shape, v.dtype) for k, v in Transformer(config).state_dict().items()}
    groups, current, size = [], [], 0
    for key, (shape, _) in shapes.items():
        nbytes = shape.numel() * dtype.itemsize
        if current and size + nbytes > shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    groups.append(current)

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    # 4M random values, tiled once over a buffer as long as the largest tensor; each tensor is one copy of a slice
    # of it from a random offset (drawing 5.6 billion normals, or tiling per tensor, would take minutes).
    pool = (torch.randn(1 << 22, generator=gen) * 0.02).to(dtype)
    longest = max(shape.numel() for shape, _ in shapes.values()) + pool.numel()
    source = pool.repeat(-(-longest // pool.numel()))
    weight_map, total = {}, 0
    for index, keys in enumerate(groups, start=1):
        name = f"{WEIGHTS}-{index:05d}-of-{len(groups):05d}.safetensors"
        shard = {}
        for key in keys:
            shape, _ = shapes[key]
            offset = int(torch.randint(pool.numel(), (1,), generator=gen))
            shard[key] = source[offset : offset + shape.numel()].view(shape).clone()
            weight_map[key] = name
            total += shard[key].numel() * shard[key].element_size()
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        logger.info("wrote %s (%.2f GB)", name, sum(t.numel() * t.element_size() for t in shard.values()) / 1e9)
        del shard
    index_file = folder / f"{WEIGHTS}.safetensors.index.json"
    index_file.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(config_to_dict(config, CONFIG_CLASS), indent=2))
    shutil.rmtree(final, ignore_errors=True)
    folder.rename(final)


def warm_page_cache(folder: Path) -> None:
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            while f.read(1 << 26):
                pass


# ---------------------------------------------------------------------------------------------- one load (child)


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)[1])


@torch.no_grad()
def touch(model: torch.nn.Module) -> None:
    """Read one value per 4 KiB page of every weight: a loader may hand back tensors still backed by the
    memory-mapped file (nothing read yet); this makes both sides pay for actually having the weights."""
    for tensor in model.state_dict().values():
        flat = tensor.reshape(-1)
        flat[:: max(1, 4096 // tensor.element_size())].float().sum()


def child(args: argparse.Namespace) -> None:
    """Load once and print a JSON line: seconds, host bytes added at the peak and at the end, device peak."""
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    if args.child == "ours":
        from cogvideox import Transformer

        def load():
            return Transformer.from_pretrained(args.folder, dtype=dtype, device=device)

        low_cpu_mem = None
    else:
        import diffusers
        from diffusers import CogVideoXTransformer3DModel
        from diffusers.utils import is_accelerate_available

        low_cpu_mem = is_accelerate_available()

        def load():
            model = CogVideoXTransformer3DModel.from_pretrained(args.folder, torch_dtype=dtype)
            return model.to(device) if device.type != "cpu" else model

        logging.getLogger("diffusers").setLevel(logging.ERROR)
        del diffusers
    if device.type == "cuda":
        torch.cuda.init()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set (VmHWM) after the imports
    except OSError:  # some sandboxes refuse it: the peak then includes the imports (an overestimate)
        logger.warning("could not reset the peak resident set: the host peak includes the imports")
    before = _status_kib("VmRSS")
    begin = time.perf_counter()
    model = load()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - begin
    touch(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    result = {
        "seconds": seconds,
        "seconds_read": time.perf_counter() - begin,
        "host_peak": (_status_kib("VmHWM") - before) * 1024,
        "host_end": (_status_kib("VmRSS") - before) * 1024,
        "device_peak": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0,
        "device_reserved": torch.cuda.max_memory_reserved(device) if device.type == "cuda" else 0,
        "weights": sum(t.numel() * t.element_size() for t in model.state_dict().values()),
        "low_cpu_mem_usage": low_cpu_mem,
    }
    print("RESULT " + json.dumps(result))


def run_child(side: str, args: argparse.Namespace, folder: Path) -> dict:
    command = [sys.executable, __file__, "--child", side, "--folder", str(folder), "--dtype", args.dtype]
    command += ["--device", args.device, "--model", args.model]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{side} load failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    temporary = args.folder is None
    folder = Path(tempfile.mkdtemp(prefix="cogvideox-load-")) / "transformer" if temporary else args.folder
    record = {"item": "load", "model": args.model, "tiny": args.tiny, "dtype": args.dtype, "device": args.device}
    try:
        if not (folder / "config.json").exists():
            logger.info("writing a random %s checkpoint (%s) to %s", args.model, args.dtype, folder)
            begin = time.perf_counter()
            write_checkpoint(model_config(args.model, args.tiny), folder, getattr(torch, args.dtype),
                             parse_size(args.shard_size))  # fmt: skip
            logger.info("written in %.1f s", time.perf_counter() - begin)
        else:
            logger.info("reusing the checkpoint in %s", folder)
        if args.write_only:
            return
        shards = sorted(folder.glob("*.safetensors"))
        largest = max(p.stat().st_size for p in shards)
        record.update(shards=len(shards), largest_shard=largest)
        warm_page_cache(folder)
        runs = {"ours": [], "reference": []}
        for _ in range(args.repeats):
            for side in runs:
                runs[side].append(run_child(side, args, folder))
                logger.info("%s: %s", side, runs[side][-1])
                record["runs"] = runs
                write_json(args.json, record)
    finally:
        if temporary:
            shutil.rmtree(folder.parent, ignore_errors=True)
    report(args, runs, len(shards), largest, record)


def report(args: argparse.Namespace, runs: dict, shard_count: int, largest: int, record: dict) -> None:
    gib = 2**30
    seconds = {side: statistics.median(r["seconds"] for r in results) for side, results in runs.items()}
    peak = {side: max(r["host_peak"] for r in results) for side, results in runs.items()}
    read = {side: statistics.median(r["seconds_read"] for r in results) for side, results in runs.items()}
    record.update(seconds=seconds, seconds_read=read, host_peak=peak)
    write_json(args.json, record)
    header = ["side", "load s", "ratio", "load + first read s", "ratio", "host peak GiB", "ratio", "host after GiB"]
    if args.device.startswith("cuda"):
        header += ["device peak allocated GiB", "device peak reserved GiB"]
    rows = []
    for side, results in runs.items():
        row = [
            side if side == "ours" else f"reference (low_cpu_mem_usage={results[0]['low_cpu_mem_usage']})",
            f"{seconds[side]:.2f}",
            f"{seconds[side] / seconds['reference']:.2f}",
            f"{read[side]:.2f}",
            f"{read[side] / read['reference']:.2f}",
            f"{peak[side] / gib:.2f}",
            f"{peak[side] / peak['reference']:.2f}",
            f"{max(r['host_end'] for r in results) / gib:.2f}",
        ]
        if args.device.startswith("cuda"):
            row.append(f"{max(r['device_peak'] for r in results) / gib:.2f}")
            row.append(f"{max(r.get('device_reserved', 0) for r in results) / gib:.2f}")
        rows.append(row)
    table = markdown_table(header, rows)
    weights = runs["ours"][0]["weights"]
    what = f"{args.model} (tiny widths, 2 blocks)" if args.tiny else args.model
    facts = (
        f"{what} transformer, {weights / gib:.2f} GiB of {args.dtype} weights in {shard_count} shards "
        f"(largest {largest / gib:.2f} GiB), loaded onto {args.device}; {args.repeats} loads per side, "
        "each in a fresh process, files in the page cache; load = from_pretrained until it returns, first read "
        "= one value per page of every weight after it; host peak = peak resident set (up to the end of the "
        "first read) minus the set before the load, weights included"
    )
    print(f"\n{facts}\n\n{table}\n")
    if not args.no_results:
        entry = f"### {today()}: {machine(torch.device(args.device))}\n\n`{command_line()}`\n\n{facts}.\n\n{table}\n"
        append_result("Loading", entry)
        logger.info("appended to benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
