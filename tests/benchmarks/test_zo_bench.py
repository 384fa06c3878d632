"""The CPU ZO benchmark (benchmarks/zo) at toy size: every section runs, every implementation is timed and
counted, the report's JSON has the structure the Markdown and docs/zo.md read. No timing assertions."""

import json

import pytest
import torch

from benchmarks.zo import impls as Z
from benchmarks.zo import run

IMPLS = ("mezo-loop", "plain-loop", "lopt-lowrank", "lopt-highrank", "lopt-fullrank")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("zo-bench") / "zo-toy"
    threads = torch.get_num_threads()
    try:
        assert run.main(["--model", "tiny", "--quick", "--batch", "8", "--grid-directions", "1,2",
                         "--grid-batch", "4,8", "--grid-rank", "2,8", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads(out.with_suffix(".json").read_text()), out.with_suffix(".md").read_text()


def test_every_implementation_ran_and_was_counted(report):
    data, _ = report
    assert data["status"] == "ok" and data["model"]["name"] == "tiny"
    speed = data["speed"]["impls"]
    assert set(speed) == {*IMPLS, run.SHARED}
    for name, row in speed.items():
        assert row["rounds"] == 1 and row["median_s"] > 0, name
        assert row["speedup_vs_mezo"] > 0 and row["speedup_vs_plain"] > 0, name
        assert row["abs_loss_diff_median"] > 0, name  # a perturbation that moved the loss
    memory = data["memory"]
    assert set(memory["impls"]) == {*IMPLS, run.SHARED}
    assert memory["inference"]["scoring"]["peak"] > memory["inference"]["scoring"]["persistent"] > 0
    for name, row in memory["impls"].items():
        assert row["peak"] > row["persistent"] > 0 and row["ratio_to_inference"] > 0, name


def test_the_implementations_compute_the_same_objective(report):
    data, _ = report
    check = data["speed"]["objective_check"]
    clean = check["clean_loss_at_start"]
    assert set(clean) == {*IMPLS, run.SHARED}
    assert check["clean_loss_max_abs_diff"] < 1e-5  # one objective, computed three ways, at the same weights
    same = check["mezo_vs_plain_same_seed"]
    assert same["steps"] == 2 and same["g_max_rel_diff"] < 1e-2  # same z stream: the same projected gradients


def test_boundary_scaling_and_bf16_sections(report):
    data, md = report
    b = data["boundary"]
    assert b["first_layer"] == 2 and b["forward_fraction_predicted"] == pytest.approx(0.75)
    assert set(b["kinds"]) == {"lopt-lowrank", "lopt-fullrank"} and all(k["ratio"] > 0 for k in b["kinds"].values())
    sc = data["scaling"]
    assert [r["directions"] for r in sc["directions"]] == [1, 2]
    assert {(r["impl"], r["batch"]) for r in sc["batch"]} == {(n, b) for n in IMPLS[:3] for b in (4, 8)}
    assert {(r["impl"], r["rank"]) for r in sc["rank"]} == {(n, r) for n in IMPLS[2:4] for r in (2, 8)}
    for axis in ("directions", "batch", "rank"):
        assert all(r["median_s"] > 0 and r["peak_bytes"] > 0 for r in sc[axis]), axis
    bf = data["bf16"]
    assert set(bf["kinds"]) == {f"{k}@eps={e}" for k in ("lowrank", "fullrank") for e in ("0.001", "0.01")}
    assert bf["steps"] == 4
    for kind, r in bf["kinds"].items():
        assert r["update_norm"] > 0 and r["gap_over_update"] >= 0, kind
    goals = {g["goal"] for g in data["goals"]}
    assert any("lopt-lowrank speed vs mezo-loop" in g for g in goals) and any(g.startswith("bf16") for g in goals)
    for title in ("## Goals", "## Seconds per step", "## Peak bytes", "## Boundary", "## Scaling", "## bf16"):
        assert title in md


def test_plain_loop_draws_mezo_stream():
    """The plain loop's z (normal_ with a seeded generator, per parameter) is MeZO's torch.normal stream."""
    model, _ = Z.load(Z.TINY)
    batch = Z.synthetic_batch(model.config.vocab_size, 2, seq_len=8)
    plain = Z.make("plain-loop", model, batch, lr=0.0)
    start = {n: p.detach().clone() for n, p in plain.model.named_parameters()}
    plain._pass(1234, 1.0)
    torch.manual_seed(1234)
    params = dict(plain.model.named_parameters())
    for name in plain.names:
        z = torch.normal(mean=0, std=1, size=params[name].size())
        torch.testing.assert_close(params[name].detach() - start[name], z, rtol=0, atol=1e-6)
