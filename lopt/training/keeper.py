"""The checkpoints' lifecycle in the run directory, and ``final/``: what a run keeps to continue or to use.

A checkpoint (written whole by ``lopt.training.checkpoint``) is unconfirmed until the next step's loss has
come out finite; then it replaces the older ones lopt wrote. After a divergence the unconfirmed one goes if
its weights gave the non-finite loss, so the update that wrecked the weights is never what ``--resume``
continues from. Rank 0 alone writes; the other ranks know only the checkpoint they resumed from.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from lopt.errors import UsageError
from lopt.training.checkpoint import regroup_optimizer_states, remove, write_checkpoint
from lopt.training.run_dir import TMP_PREFIX, RunDir, checkpoint_name, checkpoint_step, checkpoints


class CheckpointKeeper:
    """The newest checkpoint known good (``last``) and a newer one not yet confirmed (``unconfirmed``)."""

    def __init__(self, run_dir: RunDir):
        self.run_dir, self.out = run_dir, run_dir.path
        self.last: Path | None = None
        self.unconfirmed: Path | None = None

    def at_step(self, step: int) -> Path | None:
        """The checkpoint of step ``step``, if this process knows one (a resume that stopped at once)."""
        return next((c for c in (self.unconfirmed, self.last) if c is not None and checkpoint_step(c) == step), None)

    def write(self, step: int, state: dict) -> Path:
        """``state`` as checkpoint ``step``, unconfirmed; the older ones stay until it is confirmed."""
        self.run_dir.record(checkpoint_name(step))
        self.unconfirmed = write_checkpoint(self.out, step, state)
        return self.unconfirmed

    def confirm(self):
        """The unconfirmed checkpoint is good: it replaces the older ones lopt wrote."""
        if self.unconfirmed is None:
            return
        self.last, self.unconfirmed = self.unconfirmed, None
        for old in checkpoints(self.out):
            if old != self.last and self.run_dir.recorded(old.name):
                self.remove(old)

    def remove(self, path: Path):
        remove(path)
        self.run_dir.forget(path.name)

    def after_divergence(self, weights_were_bad: bool) -> Path | None:
        """A step diverged. With ``weights_were_bad`` its weights (those of the unconfirmed checkpoint, if one
        was written after the last update) gave the non-finite loss: that checkpoint goes; else it is good.
        Returns the checkpoint kept, if any."""
        if weights_were_bad and self.unconfirmed is not None:
            self.remove(self.unconfirmed)
            self.unconfirmed = None
        elif self.unconfirmed is not None:
            self.confirm()
        return self.last

    def note(self) -> str:
        """Where a stopped run continues from: the newest complete checkpoint (rank 0 wrote it whole)."""
        saved = checkpoints(self.out) if self.out.is_dir() else []
        if not saved:
            return f"no checkpoint was written in {self.out} yet"
        return f"the last complete checkpoint is {saved[-1]} (--resume continues from it, with any number of ranks)"

    def disk_full_message(self) -> str:
        newest = self.unconfirmed or self.last
        kept = f"the last complete checkpoint is {newest}" if newest else "no checkpoint was written yet"
        return f"no space left on device in {self.out}; {kept}: free some space, then --resume"

    def save_final(self, model, tokenizer, weights: dict | None = None) -> Path:
        """The plain Hugging Face checkpoint (decoders dropped) with its tokenizer, swapped in atomically.
        ``weights``: the causal LM's state dict, gathered whole (``--shard``), instead of the model's own."""
        final = self.out / "final"
        self.run_dir.record("final")
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}final-", dir=self.out))
        try:
            model.save_pretrained(tmp, **({} if weights is None else dict(state_dict=weights)))
            tokenizer.save_pretrained(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.exists():
            stale = self.out / f"{TMP_PREFIX}stale-final"
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
            os.replace(tmp, final)
            shutil.rmtree(stale)
        else:
            os.replace(tmp, final)
        return final


def optimizer_states(path: Path, saved: list[dict], model, optimizers: list) -> list[dict]:
    """Checkpoint ``path``'s optimizer states laid out for ``optimizers``: one AdamW <-> one per block (e.g.
    ``--pipeline`` <-> not) are regrouped, each parameter keeping its own state."""
    if len(saved) == len(optimizers):
        return saved
    try:
        return regroup_optimizer_states(saved, model, optimizers)
    except UsageError as error:
        raise UsageError(f"{path}: {error}") from None
