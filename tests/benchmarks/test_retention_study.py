"""The retention study's harness at toy size: two methods, one step, resumable, reported."""

import json

from benchmarks.retention import one, report
from benchmarks.retention.run import study

TOY = dict(model="tiny", steps=1, batch_size=8, seq_len=160, seeds=2, eval_max_examples=2)


def test_the_study_runs_each_method_resumes_and_reports(tmp_path, monkeypatch):
    results = tmp_path / "runs"
    done = study(results, ["e2e", "lora"], lrs=[1e-3], in_process=True, **TOY)
    files = sorted(p.name for p in results.glob("*.json"))
    # The sweep on seed 0 (one rate here), then seed 1 at the picked rate.
    assert files == ["e2e-lr0.001-seed0.json", "e2e-lr0.001-seed1.json", "lora-lr0.001-seed0.json",
                     "lora-lr0.001-seed1.json"], files
    for name, runs in done.items():
        assert sorted(r["spec"]["seed"] for r in runs) == [0, 1]
        assert len({r["spec"]["lr"] for r in runs}) == 1
        for r in runs:
            assert r["before"]["kl"] == 0.0 and r["after"]["kl"] > 0, name
            assert r["tokens_per_s"] > 0 and r["trainable_params"] > 0 and r["peak_mem_gb"] > 0
    lora, e2e = done["lora"][0], done["e2e"][0]
    assert lora["trainable_params"] < e2e["trainable_params"]

    def no_rerun(spec):
        raise AssertionError(f"ran {spec['method']} again")

    monkeypatch.setattr(one, "run", no_rerun)
    again = study(results, ["e2e", "lora"], lrs=[1e-3], in_process=True, **TOY)
    assert {k: [r["spec"] for r in v] for k, v in again.items()} == {k: [r["spec"] for r in v] for k, v in done.items()}

    prefix = tmp_path / "retention-test"
    assert report.main(["--results-dir", str(results), "--out-prefix", str(prefix)]) == 0
    summary = json.loads(prefix.with_suffix(".json").read_text())
    assert list(summary["methods"]) == ["e2e", "lora"]
    assert summary["methods"]["e2e"]["tokens_per_s_vs_e2e"] == 1.0
    assert summary["methods"]["lora"]["exact_match"]["n"] == 2
    assert "| lora |" in prefix.with_suffix(".md").read_text()
    assert prefix.with_suffix(".png").stat().st_size > 5000


def test_the_sweep_picks_exact_match_then_kl_then_loss():
    from benchmarks.retention.run import best_lr

    runs = [dict(spec=dict(lr=lr), after=dict(exact_match=em, kl=kl, loss=loss))
            for lr, em, kl, loss in ((1e-4, 0.5, 0.01, 0.3), (2e-4, 0.7, 0.2, 0.9), (5e-4, 0.7, 0.2, 0.4),
                                     (7e-4, 0.7, 0.3, 0.1), (1e-3, 0.1, 0.0, 0.1))]
    assert best_lr(runs) == 5e-4
