"""The end-to-end benchmark harness at toy sizes on the CPU: matrix, worker processes, results file,
report, and the search's doubling + bisection."""

from __future__ import annotations

import json

import pytest

from benchmarks.e2e import report as report_mod
from benchmarks.e2e import run as run_mod
from benchmarks.e2e import worker as worker_mod

REQUIRED = ("method", "model", "seq_len", "batch_size", "mem_cap_gb", "recompute", "optimizer", "tokens_per_s",
            "step_ms", "persistent_gb", "transient_peak_gb", "peak_allocated_gb", "peak_reserved_gb", "mfu", "oom",
            "memory_source")


def test_matrix_writes_valid_results_and_report(tmp_path):
    out = tmp_path / "e2e-test-cpu.json"
    status = run_mod.main(["--models", "tiny", "--methods", "hf,lopt-paper,lopt", "--seq-lens", "64",
                           "--batch-sizes", "2", "--steps", "2", "--warmup", "1", "--jobs", "3", "--quiet",
                           "--out", str(out)])
    assert status == 0
    results = json.loads(out.read_text())
    for key in ("device", "torch", "triton", "commit", "date", "rows"):
        assert key in results
    rows = {r["method"]: r for r in results["rows"]}
    assert set(rows) == {"hf", "lopt-paper", "lopt"}
    for row in rows.values():
        assert all(key in row for key in REQUIRED), row
        assert row["error"] is None and row["skipped"] is None and row["oom"] is False, row
        assert row["memory_source"] == "cpu-bytes" and row["mfu"] is None and row["mem_cap_gb"] is None
        assert row["tokens_per_s"] > 0 and row["step_ms"] > 0
        assert row["persistent_gb"] > 0 and row["transient_peak_gb"] > 0
        assert row["peak_allocated_gb"] == pytest.approx(row["persistent_gb"] + row["transient_peak_gb"])
    # same model, data and optimizer: hf and LoPT start from the same loss scale, LoPT's two schedules agree
    assert rows["lopt"]["loss"] == pytest.approx(rows["lopt-paper"]["loss"], rel=1e-4)
    # the boundary schedule frees the lower block's activations before the last block runs
    assert rows["lopt"]["transient_peak_gb"] < rows["lopt-paper"]["transient_peak_gb"]
    # the planner, end to end, on the row it predicts
    assert rows["lopt"]["predicted_peak_gb"] == pytest.approx(rows["lopt"]["peak_allocated_gb"], rel=0.03)

    written = report_mod.report(out)
    md = written["markdown"].read_text()
    assert "| method | model |" in md and "| lopt |" in md and "| hf |" in md
    for kind in ("throughput", "transient"):
        png = written[kind]
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.name in md


def test_search_doubles_then_bisects(monkeypatch):
    probes = []

    def fake_worker(spec, timeout):
        probes.append(spec["batch_size"])
        fits = spec["batch_size"] <= 11
        return {**spec, "oom": not fits, "error": None if fits else "CUDA out of memory", "skipped": None}

    monkeypatch.setattr(run_mod, "run_worker", fake_worker)
    args = run_mod.parse_args(["--models", "tiny", "--methods", "lopt", "--search", "batch", "--batch-sizes", "1"])
    spec = run_mod.matrix(args)[0]
    recorded = []
    summary = run_mod.search(args, spec, "batch_size", 1, 256, 1, recorded.append)
    assert summary["max_batch_size"] == 11 and summary["search"] == "batch_size" and not summary["oom"]
    assert probes[:5] == [1, 2, 4, 8, 16] and set(probes[5:]) <= set(range(9, 16)) and 11 in probes
    # every probe is recorded, then the largest fit is timed once more as a full row
    assert len(recorded) == len(probes) and all(r["probe"] for r in recorded[:-1])
    assert recorded[-1]["batch_size"] == 11 and recorded[-1]["best_of_search"] == "batch_size"
    assert not recorded[-1].get("probe")


def test_search_on_sequence_with_granularity(monkeypatch):
    monkeypatch.setattr(run_mod, "run_worker", lambda spec, timeout: {
        **spec, "oom": spec["seq_len"] > 5000, "error": None, "skipped": None})
    args = run_mod.parse_args(["--models", "tiny", "--methods", "hf", "--search", "seq", "--seq-lens", "512",
                               "--no-measure-best"])
    summary = run_mod.search(args, run_mod.matrix(args)[0], "seq_len", 512, 1 << 17, 256, lambda row: None)
    assert 5000 - 256 < summary["max_seq_len"] <= 5000 and summary["max_seq_len"] % 256 == 0


def test_worker_rows_for_skips_and_emulated_cap():
    liger = worker_mod.run({"method": "hf+liger", "model": "tiny", "seq_len": 16, "batch_size": 1, "steps": 1,
                            "warmup": 0})
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        assert "liger_kernel" in liger["skipped"]
    selective = worker_mod.run({"method": "hf", "model": "tiny", "recompute": "selective"})
    assert "checkpointing" in selective["skipped"]
    capped = worker_mod.run({"method": "lopt", "model": "tiny", "seq_len": 16, "batch_size": 1, "steps": 1,
                             "warmup": 0, "mem_cap_gb": 1e-6})
    assert capped["oom"] is True and "emulated cap" in capped["error"]


def test_mfu_flops_of_llama_3_2_1b():
    from lopt.models.shapes import shipped_config

    config = shipped_config("llama-3.2-1b")
    per_token = worker_mod.model_flops_per_token(config, 2048)
    # 6 x 1.236B matmul parameters (the tied head counted once as a matmul) + 12 L H d T
    assert per_token == pytest.approx(6 * 1.2358e9 + 12 * 16 * 2048 * 2048, rel=0.002)
    assert worker_mod.bf16_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert worker_mod.bf16_peak_flops("NVIDIA H200") == 989e12
    assert worker_mod.bf16_peak_flops("cpu") is None
