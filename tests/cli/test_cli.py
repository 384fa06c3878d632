"""`lopt` on the command line: the flags are TrainConfig's fields, --help explains them, and every bad
input ends with one line on stderr and exit status 2, touching nothing."""

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lopt.cli import EXIT_INTERRUPTED, EXIT_USAGE, build_parser, config_from_args, main
from lopt.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run_main(capsys, *argv):
    capsys.readouterr()  # drop what set-up printed
    code = main(["train", *argv])
    captured = capsys.readouterr()
    return code, captured.err


def assert_one_line_error(code, err, *fragments):
    assert code == EXIT_USAGE
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("lopt: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


# ------------------------------------------------------------------------------------- flags <-> TrainConfig


def sample_value(field):
    """A value different from the field's default, of the flag's type."""
    meta = field.metadata
    if meta["choices"]:
        return next(c for c in meta["choices"] if c != field.default)
    return {int: 7, float: 0.25, str: "some/path", bool: True}[meta["type"]]


def test_every_config_field_is_a_flag_and_back(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # --resume reads ./runs/lopt/config.json when there is one
    parser = build_parser()
    train_parser = parser._subparsers._group_actions[0].choices["train"]
    flags = {a.dest for a in train_parser._actions if not isinstance(a, argparse._HelpAction)}
    assert flags == {f.name for f in dataclasses.fields(TrainConfig)}

    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        value = sample_value(field)
        argv = ["train", flag] if value is True else ["train", flag, str(value)]
        config = config_from_args(parser.parse_args(argv))
        assert getattr(config, field.name) == value, field.name
        # Every other field keeps its default: a flag sets exactly one field.
        assert dataclasses.replace(config, **{field.name: field.default}) == TrainConfig(), field.name
        if field.metadata["type"] is bool:
            config = config_from_args(parser.parse_args(["train", "--no-" + flag[2:]]))
            assert getattr(config, field.name) is False


def test_help_explains_the_commands_and_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "train" in out and "plan" in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for field in dataclasses.fields(TrainConfig):
        assert "--" + field.name.replace("_", "-") in out
    assert "Exit status" in out


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == EXIT_USAGE
    assert "train" in capsys.readouterr().out


def test_plan_subcommand_and_recipe_flag_reach_the_planner(tmp_path, monkeypatch, tiny_model_dir):
    plan = pytest.importorskip("lopt.planning.plan")
    if not all(hasattr(plan, name) for name in ("add_plan_arguments", "run_plan", "apply_recipe")):
        pytest.skip("lopt.planning.plan is not complete yet")
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--help"])
    assert exit_info.value.code == 0

    seen = []

    def fake_apply_recipe(config, recipe, gpu_mem):
        seen.append((recipe, gpu_mem, config.batch_size))
        return dataclasses.replace(config, batch_size=2, grad_accum=2)

    monkeypatch.setattr(plan, "apply_recipe", fake_apply_recipe)
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": f"q{i}", "answer": "a"} for i in range(4)])
    code = main(["train", "--model", tiny_model_dir, "--data", data, "--output-dir", str(tmp_path / "run"),
                 "--recipe", "8gb", "--max-steps", "1"])
    assert code == 0 and seen == [("8gb", None, 8)]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["batch_size"], saved["grad_accum"], saved["recipe"]) == (2, 2, "8gb")


# ------------------------------------------------------------------------------------- bad input


def test_missing_model_path(capsys, tmp_path):
    code, err = run_main(capsys, "--model", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "run"))
    assert_one_line_error(code, err, "model directory not found", "nope")
    assert not (tmp_path / "run").exists()


def test_unsupported_architecture_names_the_supported_families(capsys, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    code, err = run_main(capsys, "--model", str(tmp_path / "gpt2"), "--output-dir", str(tmp_path / "run"))
    assert_one_line_error(code, err, "unsupported architecture 'gpt2'", "llama, qwen2, qwen3, mistral")


def test_directory_without_a_model(capsys, tmp_path):
    (tmp_path / "empty-model").mkdir()
    code, err = run_main(capsys, "--model", str(tmp_path / "empty-model"), "--output-dir", str(tmp_path / "run"))
    assert_one_line_error(code, err, "no config.json")


@pytest.mark.parametrize(
    "name, content, fragment",
    [
        ("missing.jsonl", None, "data file not found"),
        ("empty.jsonl", "", "data file is empty"),
        ("broken.json", '[{"question": "q", "answer": ', "could not read"),
        ("fields.jsonl", '{"text": "a", "label": 1}\n',
         "none of the known fields (found: label, text); expected messages | instruction + output"),
    ],
)
def test_bad_data_files(capsys, tmp_path, name, content, fragment):
    pytest.importorskip("datasets")
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    code, err = run_main(capsys, "--data", str(path), "--output-dir", str(tmp_path / "run"))
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("num_blocks", ["0", "5"])
def test_num_blocks_out_of_range(capsys, tmp_path, num_blocks):
    code, err = run_main(capsys, "--num-blocks", num_blocks, "--output-dir", str(tmp_path / "run"))
    assert_one_line_error(code, err, "--num-blocks must be", num_blocks)


def test_non_empty_output_dir_is_left_untouched(capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in out.iterdir()}
    code, err = run_main(capsys, "--output-dir", str(out))
    assert_one_line_error(code, err, "not empty", "--resume", "--overwrite")
    assert {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in out.iterdir()} == before
    # --overwrite does not delete a directory that is not a lopt run either.
    code, err = run_main(capsys, "--output-dir", str(out), "--overwrite")
    assert_one_line_error(code, err, "does not look like a lopt run")
    assert (out / "notes.txt").read_text() == "mine"


def test_resume_without_a_checkpoint_and_conflicting_flags(capsys, tmp_path):
    code, err = run_main(capsys, "--output-dir", str(tmp_path / "run"), "--resume")
    assert_one_line_error(code, err, "no checkpoint")
    code, err = run_main(capsys, "--output-dir", str(tmp_path / "run"), "--resume", "--overwrite")
    assert_one_line_error(code, err, "exclude each other")


def test_all_masked_batch_is_skipped_and_said(capsys, tmp_path, tiny_model_dir):
    pytest.importorskip("datasets")
    rows = [{"question": "short", "answer": "ok"}, {"question": "x" * 200, "answer": "lost"}] * 2
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    code, err = run_main(capsys, "--model", tiny_model_dir, "--data", data, "--output-dir", str(tmp_path / "run"),
                         "--seq-len", "32", "--batch-size", "1", "--epochs", "1", "--seed", "0")
    assert code == 0, err
    assert err.count("skipping a batch whose labels are all masked") == 2
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # the two answerable examples; the epoch ends there
    assert (tmp_path / "run" / "final" / "config.json").is_file()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(capsys, tmp_path, tiny_model_dir, monkeypatch):
    """Update 2 blows the weights up (finite, but step 3's loss is not): checkpoint-000002 holds them and
    is dropped; checkpoint-000001 is the last good one and is kept."""
    from lopt.training.optim import AdamW

    pytest.importorskip("datasets")
    original = AdamW.step

    def blowing_up_step(self, closure=None):
        result = original(self, closure)
        if next(iter(self.state.values()))["step"] == 2:
            for group in self.param_groups:
                for p in group["params"]:
                    p.data.mul_(1e4)
        return result

    monkeypatch.setattr(AdamW, "step", blowing_up_step)
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": f"q{i}", "answer": "abc"} for i in range(8)])
    out = tmp_path / "run"
    code, err = run_main(capsys, "--model", tiny_model_dir, "--data", data, "--output-dir", str(out),
                         "--batch-size", "2", "--save-every", "1", "--max-steps", "4")
    assert code == EXIT_USAGE and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("lopt: error: non-finite loss at step 3")
    assert "checkpoint-000001" in last
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-000001"]
    assert not (out / "final").exists()


def test_resume_from_the_command_line_reuses_the_saved_settings(capsys, tmp_path, tiny_model_dir):
    pytest.importorskip("datasets")
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": f"q{i}", "answer": "abc"} for i in range(8)])
    out = tmp_path / "run"
    common = ["--model", tiny_model_dir, "--data", data, "--batch-size", "2", "--lr", "1e-3"]
    assert run_main(capsys, *common, "--output-dir", str(out), "--max-steps", "2", "--keep-checkpoint")[0] == 0
    # Only the directory, --resume and the new step limit: model, data, lr come from config.json.
    code, err = run_main(capsys, "--output-dir", str(out), "--resume", "--max-steps", "3")
    assert code == 0, err
    assert "changed settings (max_steps 2 -> 3)" in err  # the only one: the longer cosine schedule
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    saved = json.loads((out / "config.json").read_text())
    assert (saved["max_steps"], saved["model"], saved["lr"], saved["resume"]) == (3, tiny_model_dir, 1e-3, False)


# ------------------------------------------------------------------------------------- real processes


def lopt_process(*argv, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "lopt.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=kwargs.get("cwd"))


def test_bad_input_in_a_real_process_prints_one_line_and_exits_2(tmp_path):
    proc = lopt_process("train", "--model", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "run"))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_USAGE
    assert err.strip().splitlines() == [f"lopt: error: model directory not found: {tmp_path / 'missing'}"]


def test_ctrl_c_saves_a_checkpoint_then_exits_130(tmp_path):
    out = tmp_path / "run"
    proc = lopt_process("train", "--output-dir", str(out), "--max-steps", "100000", "--batch-size", "4",
                        "--save-every", "0")
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "Traceback" not in err
    checkpoints = list(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "state.pt").is_file()
    assert "--resume" in err.strip().splitlines()[-1]
    step = json.loads((checkpoints[0] / "trainer_state.json").read_text())["step"]
    assert step >= 1 and step == json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]


@pytest.mark.parametrize("kernels", ["--kernels", "--no-kernels"])
def test_the_start_line_says_which_ops_run_fused(capsys, tmp_path, tiny_model_dir, data, kernels):
    """The 4-layer Llama: 9 RMSNorms, 4 MLPs and 4 attentions run fused with --kernels, none without."""
    code, err = run_main(capsys, "--model", tiny_model_dir, "--data", data, "--output-dir", str(tmp_path / "run"),
                         "--max-steps", "1", "--batch-size", "2", "--no-retention", kernels)
    assert code == 0, err
    expected = "fused ops: rms_norm (9), swiglu (4), rope (4)" if kernels == "--kernels" else "fused ops: none"
    assert f"lopt: {expected}" in err, err


def test_a_finished_run_keeps_what_users_need_and_prints_one_summary(capsys, tmp_path, tiny_model_dir, data):
    """No --keep-checkpoint: final/, metrics, plot and eval.json stay, the checkpoint goes; the summary (task and
    reconstruction loss apart, phase times, disk) is printed once, on stdout; a --resume says what happened."""
    out = tmp_path / "run"
    capsys.readouterr()
    code = main(["train", "--model", tiny_model_dir, "--data", data, "--eval-data", data, "--output-dir", str(out),
                 "--max-steps", "2", "--batch-size", "2", "--no-retention", "--save-every", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert not list(out.glob("checkpoint-*"))
    assert {"final", "metrics.jsonl", "loss.png", "eval.json", "config.json"} <= {p.name for p in out.iterdir()}
    assert "task loss" in captured.out and "reconstruction loss" in captured.out
    assert "trained 2 steps" in captured.out and "trained 2 steps" not in captured.err
    assert captured.out.count("before -> after training:") == 1 and "before -> after" not in captured.err
    time_line = next(line for line in captured.out.splitlines() if line.startswith("time: "))
    for phase in ("loading", "evaluation before training", "training", "saving final/", "evaluation after training"):
        assert phase in time_line, time_line
    disk_line = next(line for line in captured.out.splitlines() if line.startswith("disk: "))
    on_disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert f"{on_disk / 1e6:,.0f} MB" in disk_line and "--keep-checkpoint" in disk_line
    assert "evaluation after training (15 held-out examples" in captured.err  # the phase says what it does
    code, err = run_main(capsys, "--output-dir", str(out), "--resume", "--max-steps", "3")
    assert_one_line_error(code, err, "--keep-checkpoint", "final/")


def test_own_data_holds_out_a_share_and_a_tiny_set_trained_long_is_noted(capsys, tmp_path, tiny_model_dir):
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(40)]
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    code, err = run_main(capsys, "--model", tiny_model_dir, "--data", data, "--output-dir", str(tmp_path / "run"),
                         "--max-steps", "10", "--batch-size", "8", "--no-retention")
    assert code == 0, err
    assert "held out 4 of 40 rows" in err
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert result["num_examples"] == 4
    assert "36 examples make 5 steps an epoch, so 10 steps pass over them 2.0 times" not in err  # 2 epochs: fine
    code, err = run_main(capsys, "--model", tiny_model_dir, "--data", data, "--output-dir", str(tmp_path / "again"),
                         "--max-steps", "20", "--batch-size", "8", "--no-retention", "--eval-split", "0")
    assert code == 0, err
    assert "held out" not in err and not (tmp_path / "again" / "eval.json").exists()
    assert "40 examples make 5 steps an epoch, so 20 steps pass over them 4.0 times" in err
