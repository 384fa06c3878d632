"""Running ``lopt`` as several ranks in tests: forked processes that see torchrun's variables, the flags of a
small run, and the comparison of a run with its one-process reference."""

import json
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lopt.cli import main

# Each weight tensor's distance from the reference, as a fraction of the reference's whole update. Adam turns
# roundoff in a near-zero gradient into up to a full step of one element (measured here: at most 2.5e-4 of
# the update, with --boundary fresh); a gradient summed wrong or a micro-batch missed moves tenths of it.
TOLERANCE = 1e-3

def flags(model, data, out, **overrides) -> dict:
    fields = dict(model=model, data=data, output_dir=str(out), batch_size=2, grad_accum=3, seq_len=64, lr=3e-3,
                  max_steps=4, save_every=0, retention=False, keep_checkpoint=True)  # runs are compared by their checkpoints
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


def fork_ranks(run, n: int = 2) -> list[int]:
    """``run(rank, n, port)`` in ``n`` forked processes (they meet at ``127.0.0.1:port``); their exit codes."""
    port = free_port()
    pids = []
    for rank in range(n):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                run(rank, n, port)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        pids.append(pid)
    return [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]


def kill_rank_1_after(fields: dict, log_dir: Path, steps: int = 2) -> Ranks:
    """Start ``fields``' run on 2 ranks, and kill rank 1 (SIGKILL) once ``steps`` rows are logged."""
    out = Path(fields["output_dir"])
    ranks = Ranks(argv(fields), log_dir)
    deadline = time.monotonic() + 60
    while not ((out / "metrics.jsonl").is_file() and len(metrics(out)) >= steps):
        assert time.monotonic() < deadline and ranks.poll() == [None, None], ranks.output()
        time.sleep(0.05)
    os.kill(ranks.pids[1], signal.SIGKILL)
    return ranks
