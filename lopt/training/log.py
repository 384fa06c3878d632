"""What a run tells: messages, the progress bar, ``metrics.jsonl``, the phases' seconds and ``loss.png``.

Every rank knows the same things; rank 0 alone says and writes them (``is_main``). A metrics row holds the
step's own losses, so a resumed run logs the same rows as an uninterrupted one; the rows after the
checkpoint a run resumes from are dropped first (``keep_rows_until``).
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import sys
import time

import torch
from tqdm.auto import tqdm

import lopt_kernels

from lopt.measures.plotting import plot_losses
from lopt.training.run_dir import RunDir

# A run over the user's data that passes over it more often than this is told so.
MANY_EPOCHS = 2


class RunLog:
    """The run's messages, progress bar, metrics rows and phase seconds; ``is_main``: this rank says and writes."""

    def __init__(self, run_dir: RunDir, is_main: bool, device: torch.device):
        self.run_dir, self.out, self.is_main, self.device = run_dir, run_dir.path, is_main, device
        self.metrics: list[dict] = []  # the rows logged (a resumed run's earlier ones included)
        self.phase_s: dict[str, float] = {}  # seconds of each phase of the run, for the summary
        self._bar = None
        self._window_start, self._window_tokens = time.perf_counter(), 0  # for tokens/s between logged rows

    def say(self, message: str):
        if self.is_main:  # the ranks know the same things: one of them says them
            tqdm.write(f"lopt: {message}", file=sys.stderr)

    @contextlib.contextmanager
    def phase(self, name: str, work: str = ""):
        """Say that phase ``name`` starts (and what it does), then how long it took; its seconds go to the summary."""
        self.say(f"{name}{f' ({work})' if work else ''} ...")
        started = time.perf_counter()
        yield
        self.phase_s[name] = seconds = round(time.perf_counter() - started, 1)
        self.say(f"{name}: done in {seconds:.1f} s")

    @contextlib.contextmanager
    def progress(self, total: int, initial: int):
        """The progress bar over the steps (rank 0's), open for the loop."""
        self._window_start, self._window_tokens = time.perf_counter(), 0
        self._bar = tqdm(total=total, initial=initial, desc="lopt train", unit="step", dynamic_ncols=True,
                         file=sys.stderr, disable=not self.is_main)
        try:
            yield
        finally:
            self._bar.close()

    def count(self, tokens: int):
        """A step's positions, for the tokens/s of the next row."""
        self._window_tokens += tokens

    def advance(self):
        self._bar.update(1)

    def write_step(self, step: int, epoch: int, result: dict, extra: dict):
        """The metrics row of step ``step`` (its own losses), with ``extra`` (an evaluation's) appended."""
        if not self.is_main:
            return
        tokens_per_s = self._window_tokens / max(time.perf_counter() - self._window_start, 1e-9)
        row = dict(step=step, epoch=epoch, loss=result["loss"], task_loss=result["task_loss"],
                   aux_loss=result["aux_loss"], grad_norm=result["grad_norm"], lr=result["lr"],
                   tokens_per_s=round(tokens_per_s, 1), peak_mem_gb=round(peak_memory_gb(self.device), 3))
        self._bar.set_postfix(loss=f"{row['loss']:.3f}", aux=f"{row['aux_loss']:.3g}",
                              tok_s=f"{tokens_per_s:,.0f}", mem=f"{row['peak_mem_gb']:.2f}GB", refresh=False)
        row.update(extra)
        self.metrics.append(row)
        self.run_dir.record("metrics.jsonl")
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        self._window_start, self._window_tokens = time.perf_counter(), 0

    def keep_rows_until(self, step: int):
        """A resumed run: the rows up to ``step`` stay (a kill may have cut the last line); the later ones are
        logged again."""
        rows = []
        metrics_path = self.out / "metrics.jsonl"
        if metrics_path.exists():
            for line in metrics_path.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
            rows = [r for r in rows if isinstance(r, dict) and r.get("step", math.inf) <= step]
        self.run_dir.write_text("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        self.metrics = rows

    def loss_ends(self, start_step: int) -> dict:
        """The task and reconstruction losses of this call's first and last logged steps (not a resumed
        run's earlier ones); ``first_loss``/``last_loss`` are their weighted sum, what the step minimises."""
        rows = [row for row in self.metrics if row["step"] > start_step]
        ends = {}
        for key in ("loss", "task_loss", "aux_loss"):
            ends[f"first_{key}"] = rows[0][key] if rows else None
            ends[f"last_{key}"] = rows[-1][key] if rows else None
        return ends

    def plot(self):
        if self.metrics:
            self.run_dir.record("loss.png")
            plot_losses(self.metrics, self.out / "loss.png")


def start_lines(cfg, model, *, mode: str, world_size: int, device, step: int, total_steps: int,
                num_examples: int, steps_per_epoch: int, out) -> list[str]:
    """What a run says as it starts: what trains on what, where, for how long; the fused ops; a data note."""
    n_params = sum(p.numel() for p in model.model.parameters())
    source = "embedded default model" if cfg.model is None else cfg.model
    data = cfg.data or ("the embedded sentiment task" if cfg.method == "zo" else
                        "the embedded SFT set" if cfg.embedded_model else "the embedded record task")
    if cfg.replay:
        data += f" with {cfg.replay:.0%} self-replay"
    dtype = next(model.parameters()).dtype
    where = f"resuming at step {step}" if step else "starting"
    ranks = f" x {world_size} ranks ({mode})" if world_size > 1 else ""
    lines = [f"{where}: {source} ({n_params / 1e6:.1f}M parameters, {_method(cfg, model)}) on {device}{ranks} "
             f"in {str(dtype).removeprefix('torch.')}; {data}: {num_examples} examples, {total_steps} steps of "
             f"{cfg.batch_size}x{cfg.grad_accum}; output: {out}",
             describe_fused_ops(model)]
    epochs = total_steps / steps_per_epoch
    if not cfg.embedded_data and epochs > MANY_EPOCHS:
        lines.append(f"note: {num_examples} examples make {steps_per_epoch} steps an epoch, so {total_steps} steps "
                     f"pass over them {epochs:.1f} times: a small set trained many times is learned by heart (more "
                     "data, or fewer --max-steps / --epochs)")
    return lines


def _method(cfg, model) -> str:
    """What trains: LoPT's blocks, or ZO's directions and the layers it perturbs."""
    if cfg.method != "zo":
        return f"blocks {model.block_ranges}"
    rank = f" r {cfg.zo_rank}" if cfg.zo_kind != "fullrank" else ""
    return (f"ZO {cfg.zo_kind}{rank}, eps {cfg.zo_eps:g}, {cfg.zo_directions} direction(s) a step, layers "
            f"{cfg.zo_first_layer}-{len(model.model.model.layers) - 1} trained")


def describe_fused_ops(model) -> str:
    """The start line's word on lopt_kernels' fused ops: which run, and which a patched model left unfused."""
    if not model.kernels:
        return "fused ops: none (the model's own PyTorch code; --kernels turns them on)"
    counts = lopt_kernels.fused_ops(model.model)
    fused = [f"{op} ({n})" for op, n in counts.items() if n]
    unfused = [op for op, n in counts.items() if not n]
    return "fused ops: " + (", ".join(fused) or "none") + (f"; unfused: {', '.join(unfused)}" if unfused else "")


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS; Linux reports KiB
