"""``lopt train --method zo``: the embedded sentiment task on the toy, exact resume, a classification file, the
SFT formats (causal-LM loss), and its bad inputs (one line, exit 2, nothing written)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from lopt.cli import main
from lopt.config import TrainConfig
from lopt.training.trainer import Trainer, train


def zo_config(tmp_path, name, **overrides):
    fields = dict(method="zo", model="tiny", output_dir=str(tmp_path / name), max_steps=6, batch_size=8,
                  lr=1e-2, retention=False, eval_max_examples=40, save_every=0)
    fields.update(overrides)
    return TrainConfig(**fields)


def final_params(out) -> dict:
    return load_file(str(out / "final" / "model.safetensors"))


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_embedded_sentiment_task_trains_and_reports_accuracy_before_and_after(tmp_path, capsys):
    assert main(["train", "--method", "zo", "--model", "tiny", "--max-steps", "4", "--no-retention",
                 "--eval-max-examples", "40", "--output-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr()
    assert "ZO lowrank r 2, eps 0.001, 1 direction(s) a step" in out.err and "the embedded sentiment task" in out.err
    assert "accuracy: " in out.out
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert 0 <= result["accuracy"] <= 1 and 0 <= result["before"]["accuracy"] <= 1 and result["num_examples"] == 40
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["method"] == "zo" and config["zo_kind"] == "lowrank" and config["zo_rank"] == 2
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2, 3, 4]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")  # a plain checkpoint


@pytest.mark.parametrize("kind,extra", [("lowrank", dict(zo_interval=2)), ("fullrank", {}),
                                        ("highrank", dict(zo_rank=4, zo_directions=2, zo_first_layer=2))])
def test_resume_continues_exactly(tmp_path, monkeypatch, kind, extra):
    """Stopped after step 3 (a lowrank basis renewed every 2 steps: mid-period), resumed: the same metrics and
    final weights as the run never stopped, bit for bit."""
    settings = dict(zo_kind=kind, **extra)
    train(zo_config(tmp_path, "straight", **settings))
    original = Trainer.optimizer_step

    def stop_after_three(self, micro_batches):
        result = original(self, micro_batches)
        if self.step == 2:
            self.stop_requested = True
        return result

    monkeypatch.setattr(Trainer, "optimizer_step", stop_after_three)
    first = train(zo_config(tmp_path, "resumed", **settings))
    assert first["status"] == "interrupted" and first["steps"] == 3
    monkeypatch.setattr(Trainer, "optimizer_step", original)
    second = train(zo_config(tmp_path, "resumed", resume=True, **settings))
    assert second["status"] == "completed" and second["steps"] == 6
    for a, b in zip(metrics(tmp_path / "straight"), metrics(tmp_path / "resumed"), strict=True):
        for key in ("loss", "task_loss", "grad_norm", "lr"):
            assert a[key] == b[key], (a["step"], key)
    reference = final_params(tmp_path / "straight")
    resumed = final_params(tmp_path / "resumed")
    assert reference.keys() == resumed.keys()
    for name, p in resumed.items():
        assert torch.equal(p, reference[name]), name
    rows = metrics(tmp_path / "straight")
    assert rows[0]["task_loss"] != rows[-1]["task_loss"]


def test_a_classification_file_and_the_sft_formats(tmp_path):
    rows = [{"text": f"sample {i} {'good' if i % 2 else 'bad'}", "label": i % 2} for i in range(30)]
    path = tmp_path / "cls.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # the byte tokenizer: single-byte label words, given as the rows' candidates
    cand = tmp_path / "cand.jsonl"
    cand.write_text("".join(json.dumps({"prompt": f"item {i} is", "candidates": ["-", "+"], "answer": i % 2}) + "\n"
                            for i in range(30)))
    summary = train(zo_config(tmp_path, "cand", data=str(cand), eval_split=0.2, max_steps=3))
    assert summary["eval"]["num_examples"] == 6 and "accuracy" in summary["eval"]
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": f"Q{i}?", "answer": "x" * (1 + i % 5)}) + "\n" for i in range(20)))
    summary = train(zo_config(tmp_path, "sft", data=str(qa), eval_split=0.2, max_steps=3, eval_max_examples=4))
    assert summary["status"] == "completed" and "exact_match" in summary["eval"]  # causal-LM loss, LoPT's score


@pytest.mark.parametrize("argv,fragment", [
    (["--method", "zo", "--zo-eps", "0"], "--zo-eps must be a finite number > 0"),
    (["--method", "zo", "--zo-directions", "0"], "--zo-directions must be an integer from 1"),
    (["--method", "zo", "--zo-rank", "129"], "--zo-rank must be at most the narrowest trained layer's width, 128"),
    (["--method", "zo", "--zo-first-layer", "4"], "--zo-first-layer must be a layer of the model, 0 to 3"),
    (["--method", "zo", "--num-blocks", "4"], "--num-blocks is a setting of --method lopt"),
    (["--method", "zo", "--schedule", "sequential"], "--schedule is a setting of --method lopt"),
    (["--zo-eps", "0.01"], "--zo-eps is a setting of --method zo: add --method zo"),
    (["--method", "zo", "--zo-kind", "sparse"], "invalid choice: 'sparse'"),
])
def test_bad_zo_flags_are_one_line_with_exit_2_and_touch_nothing(tmp_path, capsys, argv, fragment):
    out = tmp_path / "run"
    try:
        code = main(["train", "--model", "tiny", "--output-dir", str(out), *argv])
    except SystemExit as error:  # argparse's own refusals
        code = error.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err
    assert not out.exists()


def test_lopt_eval_on_a_zo_run_says_where_its_scores_are(tmp_path, capsys):
    out = tmp_path / "run"
    train(zo_config(tmp_path, "run", max_steps=2, eval_max_examples=8))
    capsys.readouterr()
    assert main(["eval", "--model", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lopt eval does not score yet" in err[0] and "eval.json" in err[0]


def test_no_held_out_evaluation_with_eval_max_examples_0(tmp_path):
    summary = train(zo_config(tmp_path, "run", max_steps=2, eval_max_examples=0))
    assert summary["status"] == "completed" and "eval" not in summary
