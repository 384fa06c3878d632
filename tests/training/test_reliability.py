"""What a run survives: kill -9 anywhere (checkpoint writes included), divergence, a full disk, signals,
a second run on the same directory, --overwrite beside your files, a damaged run directory.

Real processes where the operating system is the point (kill -9, signals, the lock); in-process runs
of the tiny model elsewhere. The kill -9 chain is one run killed again and again at chosen moments,
each time resumed, and it must end with the weights of a run that was never interrupted.
"""

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_qa_file
import torch
from safetensors.torch import load_file

import lopt.training.optim  # noqa: F401  (the module, for the optimizer swap below)
from lopt.cli import EXIT_USAGE, main
from lopt.config import TrainConfig
from lopt.errors import NonFiniteLossError
from lopt.training.optim import AdamW
from lopt.training.trainer import Trainer, train

REPO = Path(__file__).resolve().parents[2]
EXIT_SIGINT, EXIT_SIGTERM = 130, 143


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
    return write_qa_file(tmp_path_factory.mktemp("data") / "qa.jsonl", 8)


def run_flags(model, data, out, **overrides):
    """The small run every test trains: 6 steps of 2 over 8 examples (an epoch boundary at step 4)."""
    flags = dict(model=model, data=data, output_dir=str(out), batch_size=2, seq_len=64, lr=3e-3, max_steps=6,
                 save_every=1, keep_checkpoint=True)  # these tests are about the checkpoints
    if "retention" in {f.name for f in dataclasses.fields(TrainConfig)}:
        flags["retention"] = False  # the before/after measures are not what these tests are about
    flags.update(overrides)
    return flags


def argv(flags: dict) -> list[str]:
    out = ["train"]
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        out += [flag] if value is True else ["--no-" + flag[2:]] if value is False else [flag, str(value)]
    return out


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["task_loss"], r["aux_loss"], r["grad_norm"], r["lr"]) for r in metrics(out)]


def final_weights(out: Path) -> dict:
    return load_file(out / "final" / "model.safetensors")


def max_weight_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def one_error_line(capsys, argv_) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv_)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == EXIT_USAGE, (code, lines)
    assert len(lines) == 1 and lines[0].startswith("lopt: error: "), lines
    return code, lines[0]


def tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(root.rglob("*"))}


# ------------------------------------------------------------------------------------- kill -9, then --resume

# Runs `lopt train` and SIGKILLs itself at the n-th call of one function (KILL_AT="module.name:n" or
# "module.Class.name:n"): a kill at an exact moment, e.g. inside a checkpoint's state.pt.
KILLING_DRIVER = """
import importlib, os, signal, sys
where, n = os.environ["KILL_AT"].rsplit(":", 1)
owner_name, attr = where.rsplit(".", 1)
try:
    owner = importlib.import_module(owner_name)
except ImportError:
    module, cls = owner_name.rsplit(".", 1)
    owner = getattr(importlib.import_module(module), cls)
original, calls = getattr(owner, attr), [0]
def dying(*args, **kwargs):
    calls[0] += 1
    if calls[0] == int(n):
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
setattr(owner, attr, dying)
from lopt.cli import main
sys.exit(main(sys.argv[1:]))
"""

KILL_POINTS = [  # (where, the n-th call): each resumed process of the chain dies at the next one
    ("lopt.training.checkpoint._Writer.write", 3),  # half-way through a state.pt
    ("os.fsync", 1),  # state.pt written, its directory not yet renamed into place
    ("os.replace", 4),  # among the manifest, config.json and checkpoint renames
    ("shutil.rmtree", 1),  # removing a superseded checkpoint (or a partial write left by the last kill)
    ("lopt.training.checkpoint._Writer.write", 40),  # a later checkpoint, part-written
    ("os.replace", 9),
    ("lopt.training.keeper.CheckpointKeeper.save_final", 1),  # training done, final/ not written
]
RANDOM_KILLS = 3  # plus SIGKILL from outside at random moments


def lopt_process(args, kill_at=None):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if kill_at:
        env["KILL_AT"] = f"{kill_at[0]}:{kill_at[1]}"
        command = [sys.executable, "-c", KILLING_DRIVER, *args]
    else:
        command = [sys.executable, "-m", "lopt.cli", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_kill_9_anywhere_then_resume_ends_with_the_uninterrupted_weights(tmp_path, tiny_model_dir, qa_file):
    started = time.perf_counter()
    straight, out = tmp_path / "straight", tmp_path / "killed"
    train(TrainConfig(**run_flags(tiny_model_dir, qa_file, straight)))

    rng = random.Random(0)
    first = lopt_process(argv(run_flags(tiny_model_dir, qa_file, out)))
    while not (out / "checkpoint-000001").is_dir() and first.poll() is None:
        time.sleep(0.005)
    time.sleep(rng.uniform(0, 0.3))
    first.kill()
    first.communicate()
    kills, outcomes = [first.returncode], []
    resume = ["train", "--output-dir", str(out), "--resume"]
    plan = [(point, None) for point in KILL_POINTS] + [(None, rng.uniform(0.5, 4)) for _ in range(RANDOM_KILLS)]
    for kill_at, delay in plan:
        proc = lopt_process(resume, kill_at)
        if delay is not None:
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.kill()
        _, err = proc.communicate(timeout=300)
        kills.append(proc.returncode)
        outcomes.append((kill_at, proc.returncode, err.strip().splitlines()[-1:] if proc.returncode > 0 else ""))
        assert proc.returncode in (0, -signal.SIGKILL), outcomes
    last = lopt_process(resume)
    _, err = last.communicate(timeout=300)
    assert last.returncode == 0, err
    assert sum(rc == -signal.SIGKILL for rc in kills) >= len(KILL_POINTS), outcomes

    assert losses(out) == losses(straight)
    assert max_weight_difference(final_weights(out), final_weights(straight)) == 0
    assert not list(out.glob(".tmp-*"))
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-000006"]
    print(f"\nkill -9 chain: {sum(rc == -9 for rc in kills)} kills, {time.perf_counter() - started:.0f}s")


# ------------------------------------------------------------------------------------- exact resume, every optimizer


class Killed(BaseException):
    """What kill -9 leaves, in-process: nothing after the raise runs except the finally blocks."""


@pytest.mark.parametrize("optimizer", ["adamw", "adamw-bf16", "torch-adamw"])
def test_resume_is_exact_for_every_optimizer_with_bf16_weights(tmp_path, tiny_model_dir, qa_file, optimizer,
                                                              monkeypatch):
    if optimizer == "torch-adamw":  # not a --optimizer choice: the trainer's optimizer swapped for torch's
        monkeypatch.setattr(sys.modules["lopt.training.optim"], "build_optimizer",
                            lambda name, groups: torch.optim.AdamW(groups))
        optimizer = "adamw"
    flags = run_flags(tiny_model_dir, qa_file, tmp_path / "straight", dtype="bf16", optimizer=optimizer,
                      max_steps=4, save_every=2)
    train(TrainConfig(**flags))

    original = Trainer.optimizer_step

    def dies_in_step_three(self, micro_batches):  # checkpoint-000002 is complete; step 3 is half done
        if self.step == 2:
            raise Killed
        return original(self, micro_batches)

    flags["output_dir"] = str(tmp_path / "resumed")
    monkeypatch.setattr(Trainer, "optimizer_step", dies_in_step_three)
    with pytest.raises(Killed):
        train(TrainConfig(**flags))
    monkeypatch.setattr(Trainer, "optimizer_step", original)
    train(TrainConfig(**flags, resume=True))

    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    assert losses(resumed) == losses(straight)
    assert max_weight_difference(final_weights(resumed), final_weights(straight)) == 0
    states = [torch.load(d / "checkpoint-000004" / "state.pt", weights_only=False)["optimizers"][0]["state"]
              for d in (resumed, straight)]
    for index, saved in states[1].items():
        for key, value in saved.items():
            if torch.is_tensor(value):
                assert states[0][index][key].dtype == value.dtype, (index, key)
                assert torch.equal(states[0][index][key], value), (index, key)


# ------------------------------------------------------------------------------------- divergence


@pytest.mark.parametrize("wreck", ["huge-weights", "nan-state"])
def test_divergence_keeps_the_last_good_checkpoint_and_resumes_from_it(tmp_path, tiny_model_dir, qa_file, wreck,
                                                                       monkeypatch):
    """Update 3 wrecks the run: weights so large that step 4's loss is NaN, or a NaN in Adam's state.
    checkpoint-000002 is the last good one: it survives, finite, and --resume from it is the straight run."""
    straight = tmp_path / "straight"
    train(TrainConfig(**run_flags(tiny_model_dir, qa_file, straight)))

    original = AdamW.step

    def wrecking_step(self, closure=None):
        result = original(self, closure)
        state = next(iter(self.state.values()))
        if state["step"] == 3:
            for group in self.param_groups:
                for p in group["params"]:
                    if wreck == "huge-weights":
                        p.data.mul_(1e4)
                    else:
                        self.state[p]["exp_avg_sq"].fill_(float("nan"))
        return result

    out = tmp_path / "run"
    monkeypatch.setattr(AdamW, "step", wrecking_step)
    with pytest.raises(NonFiniteLossError) as error:
        train(TrainConfig(**run_flags(tiny_model_dir, qa_file, out)))
    message = str(error.value)
    assert f"step {4 if wreck == 'huge-weights' else 3}" in message and "checkpoint-000002" in message, message
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-000002"]
    state = torch.load(out / "checkpoint-000002" / "state.pt", weights_only=False)
    assert all(t.isfinite().all() for t in state["model"].values())
    assert max(t.abs().max().item() for t in state["model"].values()) < 10

    monkeypatch.setattr(AdamW, "step", original)
    train(TrainConfig(**run_flags(tiny_model_dir, qa_file, out), resume=True))
    assert losses(out) == losses(straight)
    assert max_weight_difference(final_weights(out), final_weights(straight)) == 0


def test_the_update_check_reads_the_device_once_per_step(tmp_path, tiny_model_dir, qa_file, monkeypatch):
    """The finiteness of weights and optimizer state rides on the one read of the step's losses."""
    reads = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: (reads.append(self.shape), original(self))[1])
    train(TrainConfig(**run_flags(tiny_model_dir, qa_file, tmp_path / "run", save_every=0, max_steps=3)))
    assert len([shape for shape in reads if shape == (4,)]) == 3, reads


# ------------------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs: one checkpoint of the tiny model (2.5 MB) fits, a second beside it does not."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_disk_full_keeps_the_last_checkpoint_and_resume_works_after_space_is_freed(
        capsys, tmp_path, tiny_model_dir, qa_file, small_disk):
    straight = tmp_path / "straight"
    train(TrainConfig(**run_flags(tiny_model_dir, qa_file, straight)))
    out = small_disk / "run"
    capsys.readouterr()
    assert main(argv(run_flags(tiny_model_dir, qa_file, out))) == EXIT_USAGE
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("lopt: error:")]
    assert "Traceback" not in err and len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    assert "no space left on device" in errors[0] and "checkpoint-000001" in errors[0], errors[0]
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-000001"]
    assert not list(out.glob(".tmp-*"))  # the partial write is gone

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    assert main(["train", "--output-dir", str(out), "--resume"]) == 0
    assert losses(out) == losses(straight)
    assert max_weight_difference(final_weights(out), final_weights(straight)) == 0


# ------------------------------------------------------------------------------------- signals, one run at a time


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, EXIT_SIGINT), (signal.SIGTERM, EXIT_SIGTERM)])
def test_a_signal_saves_a_checkpoint_and_a_second_run_is_refused_meanwhile(capsys, tmp_path, tiny_model_dir,
                                                                           qa_file, signum, status):
    out = tmp_path / "run"
    proc = lopt_process(argv(run_flags(tiny_model_dir, qa_file, out, max_steps=100000, save_every=0)))
    while proc.poll() is None and not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text()):
        time.sleep(0.05)
    before = tree(out)
    _, line = one_error_line(capsys, argv(run_flags(tiny_model_dir, qa_file, out, overwrite=True)))
    assert f"is in use by another lopt train (pid {proc.pid})" in line, line
    assert all(before[name] == tree(out).get(name) for name in before if not name.startswith("metrics"))

    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err
    assert "Traceback" not in err and "--resume" in err.strip().splitlines()[-1]
    (checkpoint,) = out.glob("checkpoint-*")
    step = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
    assert step == metrics(out)[-1]["step"] >= 1
    assert main(["train", "--output-dir", str(out), "--resume", "--max-steps", str(step + 1)]) == 0
    assert metrics(out)[-1]["step"] == step + 1


# ------------------------------------------------------------------------------------- what --overwrite may delete


def test_overwrite_removes_only_what_lopt_wrote(capsys, tmp_path, tiny_model_dir, qa_file):
    out = tmp_path / "run"
    flags = run_flags(tiny_model_dir, qa_file, out, max_steps=2)
    assert main(argv(flags)) == 0
    (out / "notes.txt").write_text("mine")
    (out / "plots").mkdir()
    (out / "plots" / "a.png").write_text("mine too")
    assert main(argv({**flags, "overwrite": True, "max_steps": 1})) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "plots" / "a.png").read_text() == "mine too"
    assert [r["step"] for r in metrics(out)] == [1]
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-000001"]


def test_output_dir_that_is_or_holds_the_input_is_refused_untouched(capsys, tmp_path, tiny_model_dir, qa_file):
    model_before = tree(Path(tiny_model_dir))
    for flags in (run_flags(tiny_model_dir, qa_file, tiny_model_dir, overwrite=True),  # the user's model dir
                  run_flags(tiny_model_dir, qa_file, Path(tiny_model_dir).parent, overwrite=True)):  # holds it
        _, line = one_error_line(capsys, argv(flags))
        assert "--model" in line and "own input" in line, line
    assert tree(Path(tiny_model_dir)) == model_before

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data = data_dir / "qa.jsonl"
    data.write_text(Path(qa_file).read_text())
    before = tree(data_dir)
    _, line = one_error_line(capsys, argv(run_flags(tiny_model_dir, str(data), data_dir, overwrite=True)))
    assert "--data" in line, line
    assert tree(data_dir) == before


def test_overwrite_refuses_a_hugging_face_model_directory(capsys, tmp_path, tiny_model_dir, qa_file):
    import shutil

    other_model = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other_model)
    before = tree(other_model)
    _, line = one_error_line(capsys, argv(run_flags(tiny_model_dir, qa_file, other_model, overwrite=True)))
    assert "Hugging Face model directory" in line, line
    assert tree(other_model) == before


# ------------------------------------------------------------------------------------- a damaged run directory


def test_a_damaged_run_directory_is_one_line(capsys, tmp_path, tiny_model_dir, qa_file):
    out = tmp_path / "run"
    assert main(argv(run_flags(tiny_model_dir, qa_file, out, max_steps=2))) == 0
    config = (out / "config.json").read_text()
    (out / "config.json").write_text(config[: len(config) // 2])
    _, line = one_error_line(capsys, ["train", "--output-dir", str(out), "--resume"])
    assert "config.json" in line and "damaged" in line, line

    (out / "config.json").write_text(config)
    state = out / "checkpoint-000002" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    _, line = one_error_line(capsys, ["train", "--output-dir", str(out), "--resume"])
    assert "checkpoint-000002" in line and "damaged" in line, line


def test_a_damaged_newest_checkpoint_falls_back_to_an_older_complete_one(capsys, tmp_path, tiny_model_dir, qa_file,
                                                                        monkeypatch):
    """A run killed in step 6 holds checkpoint 4 and 5 (5 is not confirmed before step 6's loss). Damage 5
    (lopt renames only whole checkpoints into place; a disk or a person can still break one): --resume
    says so, continues from 4, and ends where the uninterrupted run does."""
    out, straight = tmp_path / "run", tmp_path / "straight"
    train(TrainConfig(**run_flags(tiny_model_dir, qa_file, straight)))
    original = Trainer.optimizer_step

    def dies_in_step_six(self, micro_batches):
        if self.step == 5:
            raise Killed
        return original(self, micro_batches)

    monkeypatch.setattr(Trainer, "optimizer_step", dies_in_step_six)
    with pytest.raises(Killed):
        train(TrainConfig(**run_flags(tiny_model_dir, qa_file, out)))
    monkeypatch.setattr(Trainer, "optimizer_step", original)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-000004", "checkpoint-000005"]
    state = out / "checkpoint-000005" / "state.pt"
    state.write_bytes(state.read_bytes()[:5000])
    capsys.readouterr()
    assert main(["train", "--output-dir", str(out), "--resume"]) == 0
    assert "skipping the damaged checkpoint-000005" in capsys.readouterr().err
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-000006"]
    assert losses(out) == losses(straight)
    assert max_weight_difference(final_weights(out), final_weights(straight)) == 0


def test_resuming_a_finished_run_says_it_trained_no_new_steps(capsys, tmp_path, tiny_model_dir, qa_file):
    out = tmp_path / "run"
    assert main(argv(run_flags(tiny_model_dir, qa_file, out, max_steps=2))) == 0
    capsys.readouterr()
    assert main(["train", "--output-dir", str(out), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "trained 0 new steps" in printed and "already complete" in printed, printed
    assert "trained 2 steps" not in printed
