"""The output directory's rules: what a run may write there, what ``--overwrite`` may delete, who uses it.

- Nothing lopt did not create is deleted. ``.lopt-run.json`` (the manifest) names every entry lopt
  wrote into the directory, recorded before the entry is created; ``--overwrite`` removes those entries
  (and lopt's own ``.tmp-lopt-*`` leftovers) and nothing else, so files of yours beside them survive.
- ``--overwrite`` refuses a directory without a manifest (a Hugging Face model, or anything else), and
  every mode refuses a directory that is, or holds, the run's own ``--model``, ``--data`` or
  ``--eval-data``.
- One run at a time: a run holds an advisory lock (``flock``) on ``.lopt-run.lock`` for its lifetime.
  The kernel drops the lock when the process dies, however it dies, so a killed run leaves no stale
  lock behind; the file keeps the holder's pid for the message a second run gets.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
from pathlib import Path

from lopt.config import TrainConfig
from lopt.errors import UsageError

MANIFEST = ".lopt-run.json"
LOCK = ".lopt-run.lock"
TMP_PREFIX = ".tmp-lopt-"  # every temporary name lopt makes in a run directory starts so
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
MODEL_WEIGHTS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "*.gguf")


class RunDir:
    def __init__(self, path: Path):
        self.path = path
        self._recorded: set[str] | None = None

    # ----------------------------------------------------------------------------- before anything is loaded

    def check(self, cfg: TrainConfig):
        """Refuses, touching nothing, an output directory this run may not use."""
        out = self.path
        if out.exists() and not out.is_dir():
            raise UsageError(f"--output-dir {out} is a file, not a directory")
        self._refuse_inputs(cfg)
        self._refuse_in_use()
        mine = self._own_entries()
        non_empty = out.is_dir() and any(p.name not in (LOCK, MANIFEST) for p in out.iterdir())
        if cfg.resume:
            if not (out.is_dir() and checkpoints(out)):
                finished = (out / "final").is_dir()
                raise UsageError(f"--resume: no checkpoint in {out} (" + (
                    "its run finished and kept final/ only: train on from final/ with --model, or keep the "
                    "checkpoint next time with --keep-checkpoint)" if finished else
                    "start a new run without --resume, or with --overwrite if the directory holds an earlier run)"))
            return
        if non_empty and not cfg.overwrite:
            raise UsageError(f"output directory {out} is not empty: pass --resume to continue its run, --overwrite "
                             "to replace it, or choose another --output-dir")
        if non_empty and mine is None:
            if _is_hf_model(out):
                raise UsageError(f"--overwrite refuses {out}: it is a Hugging Face model directory, not a lopt run")
            raise UsageError(f"--overwrite refuses to delete anything in {out}: it does not look like a lopt run "
                             f"directory (no {MANIFEST} naming what lopt wrote there)")

    def _refuse_inputs(self, cfg: TrainConfig):
        out = self.path.resolve()
        for flag, value in (("--model", cfg.model), ("--data", cfg.data), ("--eval-data", cfg.eval_data)):
            if value is None or not Path(value).expanduser().exists():
                continue  # the embedded default, or a hub name
            where = Path(value).expanduser().resolve()
            if where == out or out in where.parents:
                raise UsageError(f"--output-dir {self.path} {'is' if where == out else 'holds'} the {flag} "
                                 f"{value}: a run never writes over its own input; choose another --output-dir")

    def _refuse_in_use(self):
        lock = self.path / LOCK
        if not lock.is_file():
            return
        fd = os.open(lock, os.O_RDONLY)
        try:
            self._try_lock(fd)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _try_lock(self, fd: int):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise UsageError(f"{self.path} is in use by another lopt train (pid {pid}); wait for it, stop it, "
                             "or choose another --output-dir") from None

    # ----------------------------------------------------------------------------- while the run uses it

    @contextlib.contextmanager
    def lock(self):
        """Creates the directory and holds its lock until the block ends."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._try_lock(fd)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self.record(LOCK)
            yield self
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def clear(self):
        """--overwrite: remove what earlier runs recorded, and lopt's partial writes; nothing else."""
        for name in sorted(self._own_entries() or ()):
            if name in (LOCK, MANIFEST):
                continue
            path = self.path / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
            self.forget(name)
        for leftover in self.path.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()

    def record(self, name: str):
        """Add ``name`` to the manifest; call it before creating the entry."""
        entries = self._entries()
        if name not in entries:
            entries.add(name)
            self._write_manifest(entries)

    def recorded(self, name: str) -> bool:
        return name in self._entries()

    def forget(self, name: str):
        entries = self._entries()
        if name in entries:
            entries.discard(name)
            self._write_manifest(entries)

    def write_text(self, name: str, text: str):
        """A recorded file, replaced whole (a kill mid-write leaves the old one)."""
        self.record(name)
        write_atomic(self.path / name, text)

    def _entries(self) -> set[str]:
        if self._recorded is None:
            self._recorded = set(self._own_entries() or ())
        return self._recorded

    def _write_manifest(self, entries: set[str]):
        write_atomic(self.path / MANIFEST, json.dumps({"written_by_lopt": sorted(entries)}, indent=2) + "\n")

    def _own_entries(self) -> list[str] | None:
        """The names the manifest records, or None without one."""
        path = self.path / MANIFEST
        if not path.is_file():
            return None
        try:
            entries = json.loads(path.read_text())["written_by_lopt"]
        except (ValueError, KeyError, TypeError):
            raise UsageError(f"{path} is damaged: lopt cannot tell what it wrote in {self.path}; clean the "
                             "directory yourself or choose another --output-dir") from None
        return [e for e in entries if isinstance(e, str) and e and "/" not in e and e not in (".", "..")]


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:06d}"


def checkpoint_step(path: Path) -> int:
    return int(CHECKPOINT_RE.match(path.name).group(1))


def checkpoints(out: Path) -> list[Path]:
    """The checkpoint directories in ``out`` that hold a ``state.pt``, oldest first."""
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := CHECKPOINT_RE.match(p.name))
             and (p / "state.pt").is_file()]
    return [p for _, p in sorted(found)]


def read_saved_config(out: Path) -> TrainConfig | None:
    """The ``config.json`` an earlier run saved in ``out``, or None; a damaged one is a one-line error."""
    path = out / "config.json"
    if not path.is_file():
        return None
    try:
        return TrainConfig.from_json(path)
    except (ValueError, TypeError, AttributeError) as error:
        raise UsageError(f"{path} is damaged ({str(error).splitlines()[0]}); --resume needs the run's settings: "
                         "start over with --overwrite") from None


def write_atomic(path: Path, text: str):
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _is_hf_model(path: Path) -> bool:
    if any(next(path.glob(pattern), None) is not None for pattern in MODEL_WEIGHTS):
        return True
    try:
        return "model_type" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False
