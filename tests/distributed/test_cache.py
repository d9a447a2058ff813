"""Step caching under parallel inference (gloo, CPU): every rank makes the same skip decisions as the single
process would, and the frames agree within 1e-5 relative.

The distances that drive First Block Cache and TeaCache, and MagCache's calibration, are summed over every rank
(Ulysses token shards without their padding, guidance halves), so each rank holds the single process's value. The
27-token cases pad the last Ulysses share: a statistic that counted the padding would differ from the single
process.
"""

from __future__ import annotations

import pytest

from tests.distributed.test_parallel import ODD_10, T2V_10, T2V_15, case
from tests.distributed.workers import launch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("google.protobuf", reason="transformers reads spiece.model through protobuf")

TOL = 1e-5
RAW = (0.0, 0.0, 0.0, 1.0, 0.0)

TWO = [
    case("5b-first-block-ulysses2-27-tokens", "5b", ODD_10, ulysses=2, method="first_block",
         options={"threshold": 0.5}),
    case("5b-first-block-cfg2", "5b", T2V_10, cfg=2, method="first_block", options={"threshold": 0.5}),
    case("1.5-teacache-ulysses2", "1.5", T2V_15, ulysses=2, method="teacache",
         options={"threshold": 0.6, "coefficients": RAW}),
    case("5b-mag-calibration-ulysses2-27-tokens", "5b", ODD_10, ulysses=2, method="mag",
         options={"calibrate": True}),
    case("5b-pab-cfg2", "5b", T2V_10, cfg=2, method="pab", options={"spatial_attention_block_skip_range": 2,
         "spatial_attention_timestep_skip_range": (-1, 1000)}),
    case("5b-faster-ulysses2", "5b", T2V_10, ulysses=2, method="faster",
         options={"unconditional_batch_skip_range": 2, "unconditional_batch_timestep_skip_range": (-1, 1000)}),
]  # fmt: skip
FOUR = [
    case("5b-first-block-ulysses2-cfg2-27-tokens", "5b", ODD_10, ulysses=2, cfg=2, method="first_block",
         options={"threshold": 0.5}),
]  # fmt: skip


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    from tests.tiny_checkpoints import reference_pipeline

    folders = {}
    for variant in ("5b", "1.5"):
        root = tmp_path_factory.mktemp(variant.replace(".", "_")) / "checkpoint"
        reference_pipeline(variant, root)
        folders[variant] = str(root)
    return folders


@pytest.mark.parametrize("cases", [TWO, FOUR], ids=["two", "four"])
def test_every_rank_decides_as_the_single_process(cases, checkpoints, tmp_path):
    world = 2 if cases is TWO else 4
    jobs = [{**c, "folder": checkpoints[c["variant"]]} for c in cases]
    results = launch("cached", world, tmp_path, cases=jobs)
    for result in results:
        assert "value" in result, f"rank {result['rank']} did not finish: {result}"
    for index, spec in enumerate(cases):
        per_rank = [r["value"][index] for r in results]
        single = per_rank[0]["single"]
        skipped = sum(v for k, v in single["stats"].items() if k.endswith("_skipped"))
        assert skipped > 0 or spec["method"] == "mag", f"{spec['name']}: nothing skipped: {single['stats']}"
        for rank, entry in enumerate(per_rank):
            got = entry["parallel"]
            assert got["stats"] == single["stats"], f"{spec['name']}: rank {rank}"
            assert got["decisions"] == single["decisions"], f"{spec['name']}: rank {rank}"
            if single["calibration"]:
                assert got["calibration"] == pytest.approx(single["calibration"], rel=1e-5)
        assert per_rank[0]["rel_err"] <= TOL, f"{spec['name']}: relative error {per_rank[0]['rel_err']:.2e}"
