"""Data parallel under torchrun (``lopt.distributed``): 2 ranks on the CPU with gloo give the one-process run.

One test starts the real command, ``torchrun --standalone --nproc-per-node 2 -m lopt train`` (about 25 s
on a loaded 2-core machine, most of it two processes importing torch and transformers). The others fork
this process into 2 ranks that set what torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) and call ``lopt``'s ``main``: the same code from the command line on, without the imports.
References are one-process runs of the same schedule, in this process. Tiny model, a few steps each.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lopt.trainer  # noqa: F401  (imported before the forks, so the ranks start at once)
from lopt.checkpoint import read_latest
from lopt.cli import EXIT_USAGE, main
from lopt.config import TrainConfig
from lopt.errors import UsageError
from lopt.run_dir import checkpoints
from lopt.trainer import train

REPO = Path(__file__).resolve().parents[1]
# Each weight tensor's distance from the reference, as a fraction of the reference's whole update. Adam turns
# roundoff in a near-zero gradient into up to a full step of one element (measured here: at most 2.5e-4 of
# the update, with --boundary fresh); a gradient summed wrong or a micro-batch missed moves tenths of it.
TOLERANCE = 1e-3

def write_rows(path: Path, n_rows: int) -> str:
    rows = [{"question": f"Q{i}: " + "abc" * (i % 5), "answer": "x" * (1 + (i * 7) % 11)} for i in range(n_rows)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """15 rows: with 6 examples a step, each epoch ends in a short step (3 examples)."""
    return write_rows(tmp_path_factory.mktemp("data") / "qa.jsonl", 15)


def flags(model, data, out, **overrides) -> dict:
    fields = dict(model=model, data=data, output_dir=str(out), batch_size=2, grad_accum=3, seq_len=64, lr=3e-3,
                  max_steps=4, save_every=0, retention=False)
    fields.update(overrides)
    return fields


def argv(fields: dict) -> list[str]:
    out = ["train"]
    for key, value in fields.items():
        flag = "--" + key.replace("_", "-")
        out += [flag] if value is True else [f"--no-{flag[2:]}"] if value is False else [flag, str(value)]
    return out


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(out: Path, reference: Path, model_dir: str):
    """The same losses at every step, and the same weights to roundoff (see ``TOLERANCE``)."""
    rows, reference_rows = metrics(out), metrics(reference)
    assert [r["step"] for r in rows] == [r["step"] for r in reference_rows]
    for a, b in zip(rows, reference_rows):
        for key in ("loss", "task_loss", "aux_loss", "grad_norm", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), (a["step"], key)
    start = load_file(Path(model_dir) / "model.safetensors")
    expected, got = weights(reference), weights(out)
    assert got.keys() == expected.keys()
    for name, p in got.items():
        update = (expected[name] - start[name]).norm()
        assert (p - expected[name]).norm() <= TOLERANCE * update, (name, (p - expected[name]).norm() / update)


# ------------------------------------------------------------------------------------- ranks by fork


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ranks:
    """``lopt`` ``main(args)`` in ``n`` forked processes that see torchrun's variables; each one's
    stdout and stderr go to ``log_dir/rank<r>.log``."""

    def __init__(self, args: list[str], log_dir: Path, n: int = 2):
        self.logs = [log_dir / f"rank{r}.log" for r in range(n)]
        port = free_port()
        self.pids = []
        for rank in range(n):
            pid = os.fork()
            if pid == 0:  # the rank
                code = 1
                try:
                    fd = os.open(self.logs[rank], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                    os.dup2(fd, 1)
                    os.dup2(fd, 2)
                    sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)
                    os.environ.update(RANK=str(rank), WORLD_SIZE=str(n), LOCAL_RANK=str(rank),
                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
                    code = main(args)
                except BaseException:
                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    os._exit(code)
            self.pids.append(pid)
        self.codes: list[int | None] = [None] * n

    def poll(self) -> list[int | None]:
        """Each rank's exit status, None while it runs."""
        for r, pid in enumerate(self.pids):
            if self.codes[r] is None:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    self.codes[r] = os.waitstatus_to_exitcode(status)
        return self.codes

    def wait(self, timeout: float = 60) -> list[int]:
        deadline = time.monotonic() + timeout
        while None in self.poll():
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"the ranks did not finish within {timeout}s:\n{self.output()}")
            time.sleep(0.05)
        return self.codes

    def kill(self):
        for r, pid in enumerate(self.pids):
            if self.codes[r] is None:
                os.kill(pid, signal.SIGKILL)
                self.codes[r] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    def output(self, rank: int | None = None) -> str:
        ranks = range(len(self.logs)) if rank is None else [rank]
        return "\n".join(self.logs[r].read_text() for r in ranks if self.logs[r].exists())


def run_ranks(fields: dict, log_dir: Path, n: int = 2) -> Ranks:
    ranks = Ranks(argv(fields), log_dir, n)
    assert ranks.wait() == [0] * n, ranks.output()
    return ranks


# ------------------------------------------------------------------------------------- the tests


def test_torchrun_two_ranks_give_the_one_process_run_and_only_rank_0_writes(tmp_path, tiny_model_dir, data):
    """--grad-accum 3 over 2 ranks: rank 0 runs micro-batches 0 and 2, rank 1 micro-batch 1, and in each
    epoch's short last step rank 1 has none. Rank 0 alone evaluates (mid-run too) and writes."""
    fields = flags(tiny_model_dir, data, tmp_path / "ranks", save_every=2, eval_data=data, eval_every=2,
                   eval_max_examples=2)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "lopt", *argv(fields)]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr

    train(TrainConfig(**dict(fields, output_dir=str(tmp_path / "one"))))
    out = tmp_path / "ranks"
    assert_same_run(out, tmp_path / "one", tiny_model_dir)
    # One writer: 4 rows (two would append 8), one final/, one eval.json, the last checkpoint only.
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir()) == [
        ".lopt-run.json", ".lopt-run.lock", "checkpoint-000004", "config.json", "eval.json", "final", "loss.png",
        "metrics.jsonl"]
    assert [("eval_loss" in r) for r in metrics(out)] == [False, True, False, False]
    assert done.stderr.count("lopt: starting:") == 1 and done.stdout.count("final checkpoint:") == 1
    assert "2 ranks (data parallel)" in done.stderr


@pytest.mark.parametrize("schedule", [dict(early_lower_step=True), dict(boundary="fresh")],
                         ids=["early-lower-step", "boundary-fresh"])
def test_per_block_steps_sum_each_block_at_its_boundary(tmp_path, tiny_model_dir, data, schedule):
    """--early-lower-step and --boundary fresh step each lower block at its boundary: each rank runs one
    micro-batch of 3 (rank 1 none in the short step) and the ranks sum the block's gradients there. The same
    as one process with the whole step in one micro-batch of 6."""
    fields = flags(tiny_model_dir, data, tmp_path / "ranks", batch_size=3, grad_accum=2, num_blocks=3, **schedule)
    run_ranks(fields, tmp_path)
    train(TrainConfig(**dict(fields, output_dir=str(tmp_path / "one"), batch_size=6, grad_accum=1)))
    assert_same_run(tmp_path / "ranks", tmp_path / "one", tiny_model_dir)


def test_sequential_schedule_with_accumulation_on_two_ranks(tmp_path, tiny_model_dir, data):
    """--schedule sequential, fresh boundary, 4 micro-batches a step over 2 ranks: each rank runs its two
    through a block, the ranks sum that block's gradients and step it; the same as one process."""
    fields = flags(tiny_model_dir, data, tmp_path / "ranks", batch_size=2, grad_accum=4, num_blocks=3,
                   schedule="sequential", boundary="fresh")
    run_ranks(fields, tmp_path)
    train(TrainConfig(**dict(fields, output_dir=str(tmp_path / "one"))))
    assert_same_run(tmp_path / "ranks", tmp_path / "one", tiny_model_dir)


def test_resume_across_rank_counts(tmp_path, tiny_model_dir, data):
    """A checkpoint holds the full state: 2 ranks' step-3 checkpoint resumed by 1 process, and 1 process's
    resumed by 2 ranks, each give the straight 6 steps (a constant rate, so stopping at step 3 with
    --max-steps 3 leaves the schedule as it was)."""
    constant = dict(warmup_steps=0, min_lr_ratio=1.0, grad_accum=2)
    straight = flags(tiny_model_dir, data, tmp_path / "straight", max_steps=6, **constant)
    train(TrainConfig(**straight))

    run_ranks(dict(straight, output_dir=str(tmp_path / "two-then-one"), max_steps=3), tmp_path)
    train(TrainConfig(**dict(straight, output_dir=str(tmp_path / "two-then-one"), resume=True)))
    assert_same_run(tmp_path / "two-then-one", tmp_path / "straight", tiny_model_dir)

    train(TrainConfig(**dict(straight, output_dir=str(tmp_path / "one-then-two"), max_steps=3)))
    run_ranks(dict(straight, output_dir=str(tmp_path / "one-then-two"), resume=True), tmp_path)
    assert_same_run(tmp_path / "one-then-two", tmp_path / "straight", tiny_model_dir)


def test_a_killed_rank_ends_the_job_with_one_clear_line_and_a_usable_checkpoint(tmp_path, tiny_model_dir, data):
    """Rank 1 killed mid-run (no torchrun here to stop the others): rank 0's next gradient sum fails at once,
    and it exits 2 naming itself, the lost peer and the last complete checkpoint, which resumes."""
    out = tmp_path / "run"
    fields = flags(tiny_model_dir, data, out, max_steps=10_000, save_every=1, dist_timeout=60)
    ranks = Ranks(argv(fields), tmp_path)
    deadline = time.monotonic() + 60
    while not ((out / "metrics.jsonl").is_file() and len(metrics(out)) >= 2):
        assert time.monotonic() < deadline and ranks.poll() == [None, None], ranks.output()
        time.sleep(0.05)
    os.kill(ranks.pids[1], signal.SIGKILL)
    killed = time.monotonic()
    codes = ranks.wait(timeout=30)
    assert codes == [EXIT_USAGE, -signal.SIGKILL], ranks.output()
    assert time.monotonic() - killed < 15  # gloo sees the closed connection; --dist-timeout is the backstop
    lines = [line for line in ranks.output(0).splitlines() if line.startswith("lopt: error:")]
    assert len(lines) == 1, ranks.output(0)
    # Whichever collective first meets the closed connection (a sum, the stop vote) names itself.
    assert lines[0].startswith("lopt: error: rank 0: ") and "failed: another rank exited" in lines[0], lines[0]
    newest = checkpoints(out)[-1]
    assert f"the last complete checkpoint is {newest}" in lines[0]
    path, state = read_latest(checkpoints(out), torch.device("cpu"))
    assert path == newest and state["step"] >= 2
    summary = train(TrainConfig(**dict(fields, resume=True, max_steps=state["step"] + 1)))
    assert summary["status"] == "completed" and summary["steps"] == state["step"] + 1


def test_settings_no_rank_count_can_run_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="--early-lower-step .* each of the 2 ranks .* --grad-accum must be at "
                                         "most 2, got 3"):
        TrainConfig(early_lower_step=True, grad_accum=3).validate()
    with pytest.raises(UsageError, match="--boundary fresh .* at most 2"):
        TrainConfig(boundary="fresh", grad_accum=4).validate()
    TrainConfig(early_lower_step=True, grad_accum=2).validate()  # one micro-batch per rank
    with pytest.raises(UsageError, match="--dist-timeout must be an integer from 1"):
        TrainConfig(dist_timeout=0).validate()


def test_python_dash_m_lopt_is_the_command():
    done = subprocess.run([sys.executable, "-m", "lopt", "train", "--help"], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert done.returncode == 0 and "--dist-timeout" in done.stdout
