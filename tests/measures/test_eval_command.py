"""`lopt eval` of a `lopt train` run measures the run's own task with its settings (its eval.json, again);
any other model needs --data (except the toy); every phase is named on stderr with its seconds."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from conftest import write_qa_file
from lopt.cli import EXIT_USAGE, main

EVAL_ROWS = 5


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir, data):
    """A one-step run on the tiny model dir with --eval-data, trained with relative paths from its own
    directory (as a user in a project directory does), so lopt eval from elsewhere must find them."""
    where = tmp_path_factory.mktemp("project")
    write_qa_file(where / "held.jsonl", EVAL_ROWS)
    cwd = os.getcwd()
    os.chdir(where)
    try:
        code = main(["train", "--model", os.path.relpath(tiny_model_dir), "--data", data, "--eval-data", "held.jsonl",
                     "--output-dir", "runs/one", "--max-steps", "1", "--seq-len", "48", "--batch-size", "4",
                     "--eval-max-examples", "3"])  # with retention: eval.json holds the KL to compare with
    finally:
        os.chdir(cwd)
    assert code == 0
    return where / "runs" / "one"


def evaluate(capsys, tmp_path, *argv):
    """``lopt eval`` with ``--output``: (exit status, the JSON, stdout, stderr)."""
    capsys.readouterr()
    output = tmp_path / "eval.json"
    code = main(["eval", *argv, "--output", str(output)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(output.read_text()), captured.out, captured.err


@pytest.mark.parametrize("which", ["final", "run directory"])
def test_a_run_is_measured_on_its_own_eval_data_with_its_settings(run, tiny_model_dir, tmp_path, capsys, which):
    model = run / "final" if which == "final" else run
    result, out, _ = evaluate(capsys, tmp_path, "--model", str(model))
    assert result["num_examples"] == EVAL_ROWS and result["num_generated"] == 3  # held.jsonl, --eval-max-examples
    assert (result["seq_len"], result["batch_size"], result["eval_max_examples"]) == (48, 4, 3)
    assert result["run"] == str(run) and Path(result["reference"]) == Path(tiny_model_dir)  # the run's original
    # The run's own final evaluation, again: the same rows, settings, weights and reference.
    saved = json.loads((run / "eval.json").read_text())
    for key in ("loss", "exact_match", "general_nll", "kl", "answer_nll"):
        assert result[key] == pytest.approx(saved[key], rel=1e-5, abs=1e-7), key
    assert "the run's --eval-data" in out and f"(the run's original model" in out
    assert f"KL from the reference: {result['kl']:.4f}" in out


def test_flags_override_the_runs_settings(run, tmp_path, capsys, data):
    result, out, _ = evaluate(capsys, tmp_path, "--model", str(run), "--data", data, "--batch-size", "2",
                              "--eval-max-examples", "1", "--no-reference")
    assert result["num_examples"] == 15 and result["num_generated"] == 1  # conftest's data: 15 rows
    assert (result["seq_len"], result["batch_size"], result["reference"]) == (48, 2, None)
    assert "kl" not in result and "reference: none (--no-reference)" in out


def test_every_phase_is_named_on_stderr_before_it_starts_and_timed_after(run, tmp_path, capsys):
    _, _, err = evaluate(capsys, tmp_path, "--model", str(run))
    lines = err.splitlines()
    for phase in ("reading the held-out rows", "loading the reference", "the reference's answers to 24 general",
                  "loading the model", f"scoring {EVAL_ROWS} held-out examples", "generating 3 answers",
                  "KL from the reference"):
        started = [i for i, line in enumerate(lines) if line.startswith(f"lopt eval: {phase}") and line.endswith("...")]
        ended = [i for i, line in enumerate(lines)
                 if line.startswith(f"lopt eval: {phase}") and re.search(r" \.\.\. \d+\.\d s$", line)]
        assert len(started) == 1 and len(ended) == 1 and started[0] < ended[0], (phase, lines)


def test_the_toy_defaults_to_its_own_held_out_split_and_the_bars_change_nothing(tmp_path, capsys, monkeypatch):
    import lopt.eval_command

    argv = ("--model", "tiny", "--seq-len", "32", "--eval-max-examples", "2")
    quiet, out, err = evaluate(capsys, tmp_path, *argv)  # stderr is no terminal: no progress bars
    assert quiet["num_examples"] == 200 and quiet["reference"] is None  # lopt.data.embedded.HELD_OUT_SIZE
    assert "the toy's SFT held-out split" in out and "lopt eval: general-text NLL on" in err
    assert "/200 [" not in err
    monkeypatch.setattr(lopt.eval_command, "BARS", False)  # as on a terminal
    with_bars, _, err = evaluate(capsys, tmp_path, *argv)
    assert "/200 [" in err and "/2 [" in err  # the examples scored, the answers generated
    for result in (quiet, with_bars):
        result.pop("phase_s")
    assert with_bars == quiet  # counting the rows of each forward pass and generation changes no result


def moved_run(run, tmp_path, **changes):
    """A copy of ``run`` elsewhere, its config.json changed."""
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    config = json.loads((moved / "config.json").read_text())
    config["model"] = str(Path(run.parents[1], config["model"]).resolve())  # was relative to the project
    config.update(changes)
    (moved / "config.json").write_text(json.dumps(config))
    return moved


def test_a_real_models_default_run_is_measured_on_the_record_task(run, tmp_path, capsys):
    """What the user report was about: no --data trains a real model (not the toy) on the record task, so
    that is its held-out set (the toy's SFT set was scored before)."""
    from lopt.data.embedded import RECORD_HELD_OUT_SIZE

    moved = moved_run(run, tmp_path, data=None, eval_data=None)  # as `lopt train --model DIR` alone writes it
    result, out, _ = evaluate(capsys, tmp_path, "--model", str(moved), "--eval-max-examples", "0", "--no-reference")
    assert result["num_examples"] == RECORD_HELD_OUT_SIZE and "the embedded record task's held-out split" in out


@pytest.mark.parametrize("original", ["a deleted directory", "a hub id not in the cache"])
def test_a_run_whose_original_model_is_not_here_is_measured_without_kl(run, tmp_path, capsys, original):
    model = str(tmp_path / "gone") if original == "a deleted directory" else "lopt-tests/not-cached"
    # moved: its relative paths no longer say where they are
    moved = moved_run(run, tmp_path, model=model, eval_data=str(run.parents[1] / "held.jsonl"))
    result, out, _ = evaluate(capsys, tmp_path, "--model", str(moved), "--eval-max-examples", "0")
    assert result["reference"] is None and "kl" not in result and result["num_examples"] == EVAL_ROWS
    assert "reference: none: the run's original model" in out and "--reference PATH gives one" in out


def one_line_error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == EXIT_USAGE
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lopt: error: "), lines
    return lines[0]


@pytest.mark.parametrize("model", ["tiny_model_dir", "owner/some-model"])
def test_a_model_that_is_no_run_needs_data(tiny_model_dir, capsys, model):
    model = tiny_model_dir if model == "tiny_model_dir" else model  # a hub id: refused before any download
    line = one_line_error(capsys, ["eval", "--model", model])
    assert "is not a lopt train run" in line and "--data FILE" in line


def test_a_run_that_trained_on_every_row_of_its_data_needs_data(tmp_path, tiny_model_dir, data, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_model_dir, "--data", data, "--output-dir", str(out), "--max-steps", "1",
                 "--seq-len", "32", "--no-retention"]) == 0
    line = one_line_error(capsys, ["eval", "--model", str(out / "final")])
    assert "trained on every row of" in line and "no held-out rows" in line and "--data FILE" in line


def test_a_run_is_measured_on_the_rows_its_eval_split_held_out(tmp_path, tiny_model_dir, capsys):
    data = write_qa_file(tmp_path / "qa40.jsonl", 40)
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_model_dir, "--data", data, "--output-dir", str(out), "--max-steps", "1",
                 "--seq-len", "32", "--batch-size", "4", "--no-retention"]) == 0
    saved = json.loads((out / "eval.json").read_text())
    result, text, _ = evaluate(capsys, tmp_path, "--model", str(out), "--no-reference")
    assert result["num_examples"] == saved["num_examples"] == 4  # --eval-split 0.1 of 40 rows
    assert result["loss"] == pytest.approx(saved["loss"], rel=1e-5) and "the run held out" in text


def test_a_run_without_final_and_a_training_checkpoint_are_refused(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoint-000001").mkdir(parents=True)
    (run / "config.json").write_text('{"num_blocks": 2, "lambda_aux": 10.0, "output_dir": "run", "seq_len": 64}')
    assert "without final/" in one_line_error(capsys, ["eval", "--model", str(run)])
    (run / "checkpoint-000001" / "state.pt").write_bytes(b"")
    line = one_line_error(capsys, ["eval", "--model", str(run / "checkpoint-000001"), "--data", "x.jsonl"])
    assert "training checkpoint" in line
