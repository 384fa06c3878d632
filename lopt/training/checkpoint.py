"""Checkpoints: what a run saves to continue exactly, written whole or not at all.

``checkpoint-NNNNNN/`` holds ``state.pt`` (model and decoders, optimizer states, RNG states, data
position) and ``trainer_state.json`` (the position, readable without torch). Both are written into a
``.tmp-lopt-*`` directory, ``state.pt`` is synced to disk, and the directory is renamed into place: a
``checkpoint-*`` directory is complete unless something outside lopt damaged it, and a ``.tmp-lopt-*``
one is a write that was cut short (a kill, a full disk), which the next run removes.

Optimizer state comes back in the dtype it was saved in. ``Optimizer.load_state_dict`` casts every
floating state tensor to its parameter's dtype, which would turn ``lopt.training.optim.AdamW``'s fp32 moments
and master copy of bf16 weights into bf16 and make a resumed run differ from an uninterrupted one.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from lopt.errors import UsageError
from lopt.training.run_dir import TMP_PREFIX, checkpoint_name

def write_checkpoint(out: Path, step: int, state: dict) -> Path:
    """``state`` as ``out/checkpoint-<step>``, replacing one of the same step; the partial write is removed
    if this fails (the error, e.g. ENOSPC, is raised)."""
    final = out / checkpoint_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}checkpoint-", dir=out))
    try:
        with open(tmp / "state.pt", "wb") as f:
            writer = _Writer(f)
            try:
                torch.save(state, writer)
            except RuntimeError:
                if writer.error is not None:  # torch reports a failed write as "unexpected pos ..."
                    raise writer.error from None
                raise
            f.flush()
            os.fsync(f.fileno())  # the rename below must not outlive the data it names
        info = {k: state[k] for k in ("step", "epoch", "step_in_epoch")}
        with open(tmp / "trainer_state.json", "w") as f:
            f.write(json.dumps(info, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            remove(final)
        os.replace(tmp, final)
        _fsync_dir(out)  # the rename itself survives a power cut
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_full(error: BaseException) -> bool:
    """Whether ``error`` is a full disk (safetensors reports it as text, not as an errno)."""
    return getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error)


class _Writer:
    """A file for ``torch.save`` that keeps the ``OSError`` of a failed write (e.g. ENOSPC)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self):
        self.f.flush()


def read_checkpoint(path: Path, device) -> dict:
    """The state saved in ``path``; a damaged one is a one-line ``UsageError``."""
    try:
        state = torch.load(path / "state.pt", map_location=device, weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as error:
        raise DamagedCheckpoint(path, error) from None
    if not isinstance(state, dict) or not {"model", "optimizers", "step", "rng"} <= state.keys():
        raise DamagedCheckpoint(path, ValueError("not a lopt checkpoint"))
    return state


def read_latest(paths: list[Path], device) -> tuple[Path, dict]:
    """The newest of ``paths`` (oldest first) that reads whole, and its state. A damaged newer one is
    skipped with a note (the resumed run replaces it); when none reads, the newest one's error is raised."""
    newest_error = None
    for path in reversed(paths):
        try:
            state = read_checkpoint(path, device)
        except DamagedCheckpoint as error:
            newest_error = newest_error or error
            continue
        if newest_error is not None:
            print(f"lopt: note: skipping the damaged {newest_error.path.name} ({newest_error.detail}); resuming "
                  f"from {path.name}", file=sys.stderr)
        return path, state
    raise newest_error


class DamagedCheckpoint(UsageError):
    def __init__(self, path: Path, error: BaseException):
        detail = str(error).splitlines()[0] if str(error).strip() else type(error).__name__
        super().__init__(f"checkpoint {path} is damaged ({detail}) and no older complete one is left: "
                         "start over with --overwrite")
        self.path, self.detail = path, detail


def remove(path: Path):
    """Delete a directory lopt wrote. It is renamed away first, so a kill mid-way leaves a ``.tmp-lopt-*``
    name (cleaned up later), never a half-deleted ``checkpoint-*`` that looks complete."""
    doomed = path.with_name(f"{TMP_PREFIX}removing-{path.name}")
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def remove_partial_writes(out: Path):
    for leftover in out.glob(f"{TMP_PREFIX}*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict):
    """``optimizer.load_state_dict(saved)``, with every state tensor back in the dtype it was saved in."""
    optimizer.load_state_dict(saved)
    for saved_group, group in zip(saved["param_groups"], optimizer.param_groups):
        for index, param in zip(saved_group["params"], group["params"]):
            state = optimizer.state.get(param, {})
            for key, value in saved["state"].get(index, {}).items():
                current = state.get(key)
                if torch.is_tensor(value) and torch.is_tensor(current) and current.dtype != value.dtype:
                    state[key] = value.to(current.device)


def regroup_optimizer_states(saved: list[dict], model, optimizers: list[torch.optim.Optimizer]) -> list[dict]:
    """``saved`` (the state dicts of one optimizer over ``model``, or of one per block) laid out for
    ``optimizers``, which split the same parameters the other way: each parameter keeps its own state.

    A run with one AdamW and one with an optimizer per block (``--pipeline``, per-block steps) then resume
    from each other's checkpoints. The groups' settings are the new optimizers' (the schedule resets ``lr``)."""
    groups = [model.param_groups(1.0)] if len(saved) == 1 else model.block_param_groups(1.0)
    if len(groups) != len(saved):
        raise UsageError(f"the checkpoint holds {len(saved)} optimizers, which fits neither one optimizer nor one "
                         f"per block of this model's {model.num_blocks}")
    by_param = {}
    for state, optimizer_groups in zip(saved, groups):
        params = [p for group in optimizer_groups for p in group["params"]]
        indices = [i for group in state["param_groups"] for i in group["params"]]
        if len(indices) != len(params):
            raise UsageError(f"the checkpoint's optimizer holds {len(indices)} parameters where this model trains "
                             f"{len(params)}: it was written for another model or --num-blocks")
        by_param.update({id(p): state["state"][i] for p, i in zip(params, indices) if i in state["state"]})
    regrouped = []
    for optimizer in optimizers:
        current = optimizer.state_dict()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        indices = [i for group in current["param_groups"] for i in group["params"]]
        regrouped.append({"state": {i: by_param[id(p)] for p, i in zip(params, indices) if id(p) in by_param},
                          "param_groups": current["param_groups"]})
    return regrouped


def rng_state(device) -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
