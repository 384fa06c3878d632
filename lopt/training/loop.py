"""The loop behind ``lopt train`` (``lopt.training.trainer.train`` builds and runs it).

``Trainer`` runs the steps and judges each one. It is composed of parts chosen once at setup
(``lopt.training.setup``) that never call back into it: the step kind (``lopt.training.steps``: how a step's
micro-batches become an update), where the state lives (``lopt.parallel.placement``: whole, paged, sharded
or staged), the optimizers and the learning-rate schedule, the finite check (``health``), the checkpoints'
lifecycle (``keeper``), the measures (``evaluator``), the log and the stop signals. A step's figures come
back summed over the ranks, so every rank reaches the same verdict.

Output directory: ``config.json``, ``metrics.jsonl``, ``checkpoint-NNNNNN/`` (the latest good one),
``loss.png``, ``eval.json`` and ``final/`` (a plain Hugging Face checkpoint with its tokenizer); what a run
may write, delete and lock there is ``lopt.training.run_dir``'s. The design is in docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from pathlib import Path

import torch

from lopt.config import TrainConfig
from lopt.data.sft import StepSchedule
from lopt.errors import NonFiniteLossError, UsageError
from lopt.training import health
from lopt.training.checkpoint import remove_partial_writes, rng_state, set_rng_state
from lopt.training.evaluator import Evaluator, TogetherEvaluator
from lopt.training.keeper import CheckpointKeeper, optimizer_states
from lopt.training.log import RunLog, start_lines
from lopt.training.lr_schedule import LrSchedule, total_steps
from lopt.training.run_dir import RunDir
from lopt.training.signals import StopSignals
from lopt.training.steps import StepBatch, StepResult



class Trainer:
    """The loop over the optimizer steps, each one's verdict, and the run's checkpoints and summary.

    ``placement`` and ``step_kind`` come built from setup (``lopt.training.setup.build_trainer``)."""

    def __init__(self, config: TrainConfig, model, tokenizer, data: tuple, run_dir: RunDir, world, optimizers,
                 placement, step_kind, evaluator=None):
        self.config, self.model, self.tokenizer, self.run_dir, self.world = config, model, tokenizer, run_dir, world
        self.examples, self.held_out = data
        self.optimizers, self.placement, self.step_kind = optimizers, placement, step_kind
        self.device, self.out = placement.device, run_dir.path
        self.schedule = StepSchedule(len(self.examples), config.batch_size, config.grad_accum, config.seed)
        self.total_steps = total_steps(config, self.schedule.steps_per_epoch)
        self.lr_schedule = LrSchedule(config, self.total_steps)
        self.log = RunLog(run_dir, world.is_main, self.device)
        self.signals = StopSignals(world.size, self.log.say)
        self.keeper = CheckpointKeeper(run_dir)
        evaluator = evaluator or (TogetherEvaluator if placement.evaluates_together else Evaluator)
        self.evaluator = evaluator(model, tokenizer, self.held_out, config, world.is_main, self.log)
        # Position: optimizer steps done, and where the data order stands.
        self.step, self.epoch, self.step_in_epoch = 0, 0, 0
        self.start_step = 0  # where this process started: the resumed checkpoint's step

    @property
    def stop_requested(self) -> bool:
        """Whether a stop was asked for (a signal, or code that stops the run as Ctrl-C would)."""
        return self.signals.requested

    @stop_requested.setter
    def stop_requested(self, value: bool):
        self.signals.requested = value

    def place(self):
        """Put the state where the placement keeps it (``--shard``: split across the ranks), once every rank
        holds rank 0's weights."""
        self.placement.place()

    # ----------------------------------------------------------------------------- one optimizer step

    def optimizer_step(self, micro_batches: list[list[int]]) -> dict | None:
        """Forward, backward and update over one step's micro-batches; None if no label token is left."""
        batch = StepBatch.of(self.examples, micro_batches)
        if batch.total_tokens == 0:
            return None
        self.optimizers.set_lr(self.lr_schedule.factor(self.step))
        result = self.step_kind.run(batch, self.step + 1)
        return self.end_step(result, batch)

    def end_step(self, result: StepResult, batch: StepBatch) -> dict:
        """The step's verdict from its summed figures (every rank has the same): stop on a non-finite loss or
        gradient (the checkpoint its weights came from goes) or on a non-finite update (the checkpoint stays);
        else confirm the newest checkpoint and return the step's metrics."""
        step = self.step + 1
        loss = result.task + self.model.lambda_aux * result.aux
        if what := health.bad_loss(step, loss, result.task, result.aux, result.grad_norm, result.grads_finite):
            raise self._diverged(what, weights_were_bad=True)
        self.keeper.confirm()  # its weights have just given a finite loss
        if not result.updated_finite:
            raise self._diverged(health.bad_update(step), weights_were_bad=False)
        return dict(loss=loss, task_loss=result.task, aux_loss=result.aux, grad_norm=result.grad_norm,
                    lr=self.optimizers.lr, tokens=batch.total_positions, label_tokens=batch.total_tokens)

    def _diverged(self, what: str, weights_were_bad: bool) -> NonFiniteLossError:
        kept = self.keeper.after_divergence(weights_were_bad)
        return health.divergence_error(what, kept, silent=not self.world.is_main)

    # ----------------------------------------------------------------------------- the loop

    def run(self) -> dict:
        """Train from the current position to the last step, or until a stop signal; returns the summary."""
        for line in self._start_lines():
            self.log.say(line)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        started = time.perf_counter()
        with self.log.progress(self.total_steps, self.step), self.signals.caught():
            interrupted = self._steps()
        checkpoint = self.save_checkpoint()  # with --pipeline every rank sends rank 0 its block here
        final_weights = result = None
        if not interrupted:  # --shard: the model is whole only across the ranks, so they finish it together
            final_weights = self.placement.final_weights()
            result = self.evaluator.final_before_parting(self.step)
        self.world.close()  # the steps are done; what follows is rank 0's alone
        self.keeper.confirm()  # no next step to try it on; the update check passed
        self.log.phase_s["training"] = round(time.perf_counter() - started, 1)
        summary = dict(status="interrupted" if interrupted else "completed", rank=self.world.rank, steps=self.step,
                       new_steps=self.step - self.start_step, **self.log.loss_ends(self.start_step),
                       output_dir=str(self.out), checkpoint=str(checkpoint) if checkpoint else None,
                       elapsed_s=round(time.perf_counter() - started, 2))
        if interrupted:
            summary["signal"] = signal.Signals(self.signals.signum or signal.SIGINT).name
        if not self.world.is_main:
            return summary
        self.log.plot()
        if interrupted:
            return summary
        return self._finish(summary, final_weights, result)

    def _steps(self) -> bool:
        """The optimizer steps from the current position; True if a stop signal ended them early."""
        cfg = self.config
        order = self.schedule.order(self.epoch)
        while self.step < self.total_steps:
            if self.step_in_epoch == self.schedule.steps_per_epoch:
                if cfg.epochs and self.epoch + 1 >= cfg.epochs:
                    break  # skipped batches can leave the step count short of epochs x steps per epoch
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
                order = self.schedule.order(self.epoch)
            micro_batches = self.schedule.micro_batches(self.epoch, self.step_in_epoch, order)
            self.step_in_epoch += 1
            result = self.optimizer_step(micro_batches)
            if result is None:
                self.log.say(f"skipping a batch whose labels are all masked (epoch {self.epoch}, batch "
                             f"{self.step_in_epoch}): its prompts fill --seq-len {cfg.seq_len}")
                continue
            self.step += 1
            self._after_step(result)
            # Every rank stops after the same step (a signal reaches the ranks at different moments).
            if self.world.any(self.stop_requested, self.device, f"agreeing to stop after step {self.step}"):
                return True
        return False

    def _after_step(self, result: dict):
        """Rank 0 logs, evaluates and saves; the others go on to the next step and wait in its first sum."""
        cfg = self.config
        self.log.count(result["tokens"])
        eval_row, eval_due = {}, self.evaluator.due(self.step, self.total_steps)
        if eval_due:
            self.placement.gather_for_evaluation(self.step)  # --pipeline: rank 0 gathers the whole model
            eval_row = self.evaluator.row(self.step)
        if self.step % cfg.log_every == 0 or self.step == self.total_steps or eval_due:
            self.log.write_step(self.step, self.epoch, result, eval_row)
        self.log.advance()
        if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
            self.save_checkpoint()

    def _finish(self, summary: dict, final_weights: dict | None, result: dict | None) -> dict:
        """A completed run, rank 0: ``final/``, the evaluation after training (``result`` when the ranks
        already ran it together), the checkpoint dropped unless kept, the phases' seconds and the disk used."""
        with self.log.phase("saving final/"):
            summary["final_dir"] = str(self.keeper.save_final(self.model, self.tokenizer, final_weights))
        result = self.evaluator.final_after_parting(self.step, result)
        if result is not None:
            summary["eval"] = result
            self.run_dir.write_text("eval.json", json.dumps(result, indent=2) + "\n")
        if not self.config.keep_checkpoint and self.keeper.last is not None:  # final/ holds what users need
            self.keeper.remove(self.keeper.last)
            self.keeper.last = summary["checkpoint"] = None
        summary.update(phase_s=dict(self.log.phase_s), disk_bytes=_disk_bytes(self.out))
        return summary

    def _start_lines(self) -> list[str]:
        lines = start_lines(self.config, self.model, mode=self.placement.describe(), world_size=self.world.size,
                            device=self.device, step=self.step, total_steps=self.total_steps,
                            num_examples=len(self.examples), steps_per_epoch=self.schedule.steps_per_epoch,
                            out=self.out)
        note = self.placement.uneven_note(self.config.grad_accum)
        return lines + ([note] if note else [])

    # ----------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> Path | None:
        """Model, decoders, optimizers, RNG states and data position, written whole (``lopt.training.checkpoint``).
        The older checkpoints stay until this one's weights have given a finite loss. Rank 0 alone writes the
        whole state, so a checkpoint resumes on any number of ranks: None elsewhere."""
        saved = self.keeper.at_step(self.step)
        if self.world.broadcast_object(saved is not None):  # this step is saved (a resume that stopped at once)
            return saved if self.world.is_main else None
        gathered = self.placement.checkpoint_state(self.step)  # every rank takes part; rank 0 gets it whole
        if gathered is None:
            return None
        model_state, optimizer_state_dicts = gathered
        return self.keeper.write(self.step, dict(
            model=model_state, optimizers=optimizer_state_dicts,
            step=self.step, epoch=self.epoch, step_in_epoch=self.step_in_epoch,
            rng=rng_state(self.device),
            config=dataclasses.asdict(self.config),
        ))

    def load_checkpoint(self, path: Path, state: dict):
        """Continue from ``state``, read from checkpoint ``path`` (``lopt.training.checkpoint.read_latest``)."""
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as error:
            raise UsageError(f"{path} does not fit this model: {str(error).splitlines()[0]}") from None
        saved = optimizer_states(path, state["optimizers"], self.model, self.optimizers.all)
        self.placement.load_optimizer_states(saved)
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        self.start_step = self.step
        set_rng_state(state["rng"], self.device)
        self.keeper.last = path
        if not self.world.is_main:
            return
        self.log.keep_rows_until(self.step)  # the rows after it are logged again; a kill may have cut the last
        remove_partial_writes(self.out)
        if self.step >= self.total_steps:
            self.log.say(f"{path.name} is already at step {self.step} of {self.total_steps}; raise --max-steps or "
                         "--epochs to train further")


def _disk_bytes(path: Path) -> int:
    """Bytes of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
