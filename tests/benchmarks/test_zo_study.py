"""The ZO study at toy size (the 4-layer tiny model of ``lopt.models.shapes``): every method runs, the study
resumes without rerunning, the report builds. No timing assertions."""

import json

from benchmarks.zo_study import report, run
from benchmarks.zo_study.methods import METHODS, answer_batch
from benchmarks.zo_study.run import best_lr, study

TOY = dict(model="tiny", budget_s=0.15, batch_size=4, seeds=1, eval_rows=8, train_rows=32, checkpoints=2,
           probe_batch=24)


def test_every_method_runs_resumes_and_reports(tmp_path, monkeypatch):
    results = tmp_path / "runs"
    lrs = {name: [1e-3] for name in METHODS}
    done = study(results, list(METHODS), lrs, **TOY)
    files = sorted(p.name for p in results.glob("*-seed*.json"))
    assert files == sorted(f"{name}-lr0.001-seed0.json" for name in METHODS), files
    for name, runs in done.items():
        (r,) = runs
        assert r["steps"] >= 1 and r["s_per_step"] > 0 and r["peak_bytes"] > r["persistent_bytes"] > 0, name
        assert r["trainable_params"] > 0 and r["zeroth_order"] == METHODS[name].zeroth_order
        assert r["curve"][0]["steps"] == 0 and r["curve"][-1]["steps"] == r["steps"]
        assert 0 <= r["after"]["accuracy"] <= 1 and r["after"]["kl"] >= 0 and r["before"]["kl"] == 0.0
    # LoRA trains fewer parameters than end-to-end; the upper-half ZO trains half the layers' linears.
    assert done["lora"][0]["trainable_params"] < done["e2e"][0]["trainable_params"]
    assert done["zo-upper"][0]["trainable_params"] * 2 == done["zo-lowrank"][0]["trainable_params"]

    def no_rerun(task, name, *args):
        raise AssertionError(f"ran {name} again")

    monkeypatch.setattr(run, "run_one", no_rerun)
    again = study(results, list(METHODS), lrs, **TOY)
    assert {k: [r["spec"] for r in v] for k, v in again.items()} == {k: [r["spec"] for r in v] for k, v in done.items()}

    prefix = tmp_path / "zo-study"
    assert report.main(["--results-dir", str(results), "--out-prefix", str(prefix)]) == 0
    summary = json.loads(prefix.with_suffix(".json").read_text())
    assert list(summary["methods"]) == list(METHODS)
    assert summary["methods"]["e2e"]["memory_vs_e2e"] == 1.0
    assert summary["goal"]["best_zo"] in ("mezo-loop", "zo-lowrank", "zo-fullrank", "zo-upper")
    assert "| zo-lowrank |" in prefix.with_suffix(".md").read_text()
    assert prefix.with_suffix(".png").stat().st_size > 5000


def test_the_sweep_picks_accuracy_then_kl_and_skips_diverged_runs():
    runs = [dict(spec=dict(lr=lr), after=dict(accuracy=acc, kl=kl), diverged=div)
            for lr, acc, kl, div in ((1e-4, 0.8, 0.01, False), (2e-4, 0.9, 0.2, False), (3e-4, 0.9, 0.1, False),
                                     (1e-3, 0.95, 0.0, True))]
    assert best_lr(runs) == 3e-4


def test_lopt_batch_labels_only_the_answer_token():
    import torch

    batch = {"input_ids": torch.tensor([[5, 6, 7], [8, 9, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
             "last_index": torch.tensor([2, 1]), "candidate_ids": torch.tensor([[40, 41], [40, 41]]),
             "label": torch.tensor([1, 0])}
    out = answer_batch(batch, pad=0)
    assert out["input_ids"].tolist() == [[5, 6, 7, 41], [8, 9, 40, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert out["labels"].tolist() == [[-100, -100, -100, 41], [-100, -100, 40, -100]]
