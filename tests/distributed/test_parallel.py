"""Parallel inference on the CPU with gloo: 2 and 4 spawned processes against the single-process pipeline.

Each launch runs several cases in the same processes (start-up costs ~3-5 s per process on 2 cores). Per case,
rank 0 first runs the plain pipeline, then every rank runs it parallel with the same seed; the frames (np,
float32) must agree within 1e-5 relative. The collective counts prove the mode really ran: Ulysses makes two
all-to-alls per block and forward pass, guidance parallel one all-gather per step, the tiled decode gathers.

Token counts of the tiny models (2 heads, 2 layers): 32x48 pixels -> 2x3 patches per latent frame; 9 frames (1.0)
are 3 latent frames = 18 video tokens, 48x48 gives 27 (odd: padded for Ulysses 2 and 4); 17 frames (1.5) are
6 latent frames = 3 temporal patches = 18 tokens (padded to 20 for Ulysses 4, which also pads 2 heads to 4).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.workers import STEPS, launch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("google.protobuf", reason="transformers reads spiece.model through protobuf")

TOL = 1e-5
LAYERS = 2  # the tiny checkpoints' num_layers
TILES = {  # 32-pixel tiles (4 latents) overlapping by a quarter: 2x2 tiles at 32x48 and at 48x48
    "tile_sample_min_height": 32,
    "tile_sample_min_width": 32,
    "tile_overlap_factor_height": 0.25,
    "tile_overlap_factor_width": 0.25,
}
VARIANTS = ("2b", "5b", "5b-i2v", "1.5", "1.5-i2v")
T2V_10 = {"num_frames": 9, "height": 32, "width": 48}
ODD_10 = {"num_frames": 9, "height": 48, "width": 48}  # 27 video tokens
T2V_15 = {"num_frames": 17, "height": 32, "width": 48}


def case(name: str, variant: str, call: dict, ulysses: int = 1, cfg: int = 1, **extra) -> dict:
    return {
        "name": name,
        "variant": variant,
        "parallel": {"ulysses_degree": ulysses, "cfg_degree": cfg},
        "call": call,
        **extra,
    }


TWO = [
    case("5b-t2v-ulysses2-27-tokens", "5b", ODD_10, ulysses=2, bad_call_first=True, frame_mask=True),
    case("5b-t2v-cfg2", "5b", T2V_10, cfg=2),
    case("2b-t2v-ulysses2-tiled-decode", "2b", ODD_10, ulysses=2, tiling=TILES),
    case("5b-i2v-ulysses2", "5b-i2v", T2V_10, ulysses=2, image=1),
    case("1.5-t2v-ulysses2", "1.5", T2V_15, ulysses=2),
    case("1.5-i2v-cfg2", "1.5-i2v", T2V_15, cfg=2, image=2),
]
FOUR = [
    case(
        "5b-t2v-ulysses2-cfg2-27-tokens-tiled-decode",
        "5b",
        ODD_10,
        ulysses=2,
        cfg=2,
        tiling=TILES,
        bad_call_first=True,
    ),  # fmt: skip
    case("1.5-i2v-ulysses4-padded-heads-and-tokens", "1.5-i2v", T2V_15, ulysses=4, image=3),
    case(
        "1.5-t2v-ulysses2-cfg2-two-videos-tiled-sliced-decode",
        "1.5",
        {**T2V_15, "num_videos_per_prompt": 2},
        ulysses=2,
        cfg=2,
        tiling=TILES,
        slicing=True,
    ),  # fmt: skip
    case("2b-t2v-ulysses4-cfg1-27-tokens", "2b", ODD_10, ulysses=4, frame_mask=True),
    # Two caller-made sub-groups of 2 running side by side; a bad call on each first must not tear them down.
    case("5b-t2v-ulysses2-on-each-half-sub-group", "5b", ODD_10, ulysses=2, halves=True, bad_call_first=True),
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    from tests.tiny_checkpoints import reference_pipeline

    folders = {}
    for variant in VARIANTS:
        root = tmp_path_factory.mktemp(variant.replace(".", "_")) / "checkpoint"
        reference_pipeline(variant, root)
        folders[variant] = str(root)
    return folders


def run_cases(cases: list[dict], world: int, checkpoints: dict, tmp: Path) -> dict[str, list[dict]]:
    jobs = [{**c, "folder": checkpoints[c["variant"]]} for c in cases]
    results = launch("parity", world, tmp, cases=jobs)
    for result in results:
        assert "value" in result, f"rank {result['rank']} did not finish: {result}"
    return {c["name"]: [r["value"][index] for r in results] for index, c in enumerate(cases)}


@pytest.fixture(scope="module")
def two_processes(checkpoints, tmp_path_factory):
    return run_cases(TWO, 2, checkpoints, tmp_path_factory.mktemp("two"))


@pytest.fixture(scope="module")
def four_processes(checkpoints, tmp_path_factory):
    return run_cases(FOUR, 4, checkpoints, tmp_path_factory.mktemp("four"))


def check_case(spec: dict, per_rank: list[dict]) -> None:
    group_size = len(per_rank) // 2 if spec.get("halves") else len(per_rank)
    for rank, result in enumerate(per_rank):
        if rank % group_size:
            assert result["frames_is_none"], "only rank 0 of the (sub-)group receives the frames"
            continue
        assert not result["frames_is_none"]
        assert result["shape"] == result["expected_shape"]
        assert result["rel_err"] <= TOL, f"{spec['name']}: rank {rank}: relative error {result['rel_err']:.2e}"
    if spec.get("halves"):
        assert all(r["half_all_reduce"] == group_size and r["world_all_reduce"] == len(per_rank) for r in per_rank)

    ulysses, cfg = spec["parallel"]["ulysses_degree"], spec["parallel"]["cfg_degree"]
    for result in per_rank:
        assert result["collective_device"] == "cpu"  # gloo: control tensors on the CPU
        # The parallel call ran under a kernel that refuses masks: one call per block and step, none with a mask
        # (Ulysses drops the padding keys of the 27-token cases instead of masking them).
        assert result["kernel_calls"] == LAYERS * STEPS
        if spec.get("bad_call_first"):  # refused alike on every rank before any collective: nothing torn down
            assert result["bad_call"].startswith("ValueError: num_frames=10: CogVideoX 1.0 needs 8N+1 frames")
            assert not result["aborted_after_bad_call"]
        if spec.get("frame_mask"):  # a caller's frame_mask still masks (the real keys only) under Ulysses
            assert result["frame_mask_rel_err"] <= TOL, f"frame_mask: relative error {result['frame_mask_rel_err']:.2e}"
    for counts in (r["counts"] for r in per_rank):
        # Ulysses: an all-to-all before and after attention, per block and step; none without it.
        assert counts["all_to_all_single"] == (2 * LAYERS * STEPS if ulysses > 1 else 0)
        # One all-gather per step for the Ulysses output, one for the guidance predictions.
        assert counts["all_gather"] == STEPS * ((ulysses > 1) + (cfg > 1))
        # Tiled decode: one gather per round of tiles (2x2 tiles; per video when sliced), none when not split.
        rounds = -(-4 // len(per_rank)) * (spec["call"].get("num_videos_per_prompt", 1) if spec.get("slicing") else 1)
        assert counts["gather"] == (rounds if spec.get("tiling") else 0)


@pytest.mark.parametrize("spec", TWO, ids=[c["name"] for c in TWO])
def test_two_processes_equal_one(spec, two_processes):
    check_case(spec, two_processes[spec["name"]])


@pytest.mark.parametrize("spec", FOUR, ids=[c["name"] for c in FOUR])
def test_four_processes_equal_one(spec, four_processes):
    check_case(spec, four_processes[spec["name"]])


# ------------------------------------------------------------------------------------------------ failures


def test_an_error_on_one_rank_ends_every_rank_at_once(checkpoints, tmp_path):
    """Rank 1 raises after step 0; rank 0, waiting in the next all-to-all, must fail within a second or two, far
    below the 30 s group timeout, and both tear their groups down."""
    results = launch("failure", 2, tmp_path, folder=checkpoints["5b"], mode="raise", group_timeout_s=30)
    failing, peer = results[1]["value"], results[0]["value"]
    assert failing["ended"] == "ValueError: injected failure"
    assert peer["ended"].startswith("PeerFailure: rank 0: a collective failed, most likely because another rank")
    assert peer["seconds"] < 10, f"rank 0 took {peer['seconds']:.1f} s to stop"
    assert failing["aborted"] and peer["aborted"]
    for result in (peer, failing):
        assert result["call_after_abort"].startswith("RuntimeError: the parallel process groups were torn down")
        # Only the package's own groups went: the default group works, and enable_parallel builds new groups.
        assert result["world_all_reduce"] == 2.0
    assert peer["new_groups_call"] == "frames" and failing["new_groups_call"] == "none"


def test_a_hung_rank_ends_its_peers_at_the_timeout(checkpoints, tmp_path):
    """Rank 1 stops answering (sleeps past the 3 s group timeout): rank 0's collective times out and raises."""
    timeout = 3
    results = launch("failure", 2, tmp_path, folder=checkpoints["5b"], mode="hang", group_timeout_s=timeout)
    peer = results[0]["value"]
    assert peer["ended"].startswith("PeerFailure: rank 0: a collective failed")
    assert "Timed out" in peer["ended"]
    assert timeout <= peer["seconds"] < timeout + 10, f"rank 0 stopped after {peer['seconds']:.1f} s"
    assert "value" in results[1], f"the hung rank did not end by itself: {results[1]}"
    assert results[1]["value"]["ended"].startswith("PeerFailure: rank 1")
    assert all(r["value"]["world_all_reduce"] == 2.0 for r in results)  # the default group survived


# ------------------------------------------------------------------------------------------------ torchrun


def test_torchrun_cli_writes_one_file_from_rank_0(checkpoints, tmp_path):
    output = tmp_path / "video.gif"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "cogvideox", "generate", "--model", checkpoints["5b"], "--prompt", "a red circle",
        "--num-inference-steps", "2", "--num-frames", "9", "--height", "32", "--width", "48",
        "--max-sequence-length", "16", "--ulysses-degree", "2", "--output", str(output), "--quiet",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["video.gif"]
    assert done.stdout.strip().splitlines() == [str(output)]  # printed once: by rank 0
