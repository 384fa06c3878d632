"""A run's measures: the task score and retention before training, every ``--eval-every`` steps, and after.

Before training the model as loaded is measured, and the retention reference (its answers to general
prompts) is taken, before any checkpoint is loaded: a resumed run compares with the same original model.
``Evaluator``: rank 0 holds the whole model and evaluates alone, after the ranks part. ``TogetherEvaluator``
(``--shard``): the model is whole only across the ranks, so every rank evaluates, synced, before they part.
The kind follows the placement, chosen once at setup.
"""

from __future__ import annotations

from lopt.measures.classification import accuracy
from lopt.measures.evaluation import task_score
from lopt.measures.retention import RetentionProbe


class Evaluator:
    """Rank 0 measures (``takes_part``); the other ranks skip every measure."""

    synced = False  # after setup: whether the ranks evaluate one model together

    def __init__(self, model, tokenizer, held_out, config, is_main: bool, log):
        self.model, self.tokenizer, self.held_out, self.config, self.log = model, tokenizer, held_out, config, log
        self.takes_part = is_main
        self.probe: RetentionProbe | None = None  # set with the measures before training
        self.before: dict = {}

    def measure_before(self):
        """The task score and retention of the model as loaded (whole on every rank still), and the reference
        that KL is measured against."""
        if not self.takes_part:
            return
        with self.log.phase("evaluation before training", self._work()):
            if self.config.retention:
                self.probe = RetentionProbe(self.model.model, self.tokenizer, self.config.seq_len,
                                            self.config.batch_size)
            self.before = self._measure(0, synced=False, as_built=True)

    def due(self, step: int, total_steps: int) -> bool:
        """Whether the held-out set is scored after step ``step`` (every rank knows)."""
        cfg = self.config
        return bool(cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps
                    and self.held_out is not None)

    def row(self, step: int) -> dict:
        """The metrics row's evaluation columns after step ``step`` (empty on a rank that does not take part)."""
        if not self.takes_part:
            return {}
        result = self.evaluate(step, self.synced)
        return {"eval_loss": result["loss"], "exact_match": result["exact_match"]}

    def evaluate(self, step: int, synced: bool) -> dict:
        """Held-out task loss (token-weighted), answer-token accuracy and exact match of greedy answers."""
        result = dict(step=step, **task_score(self.model.model, self.tokenizer, self.held_out, self.config.batch_size,
                                              self.config.eval_max_examples, synced=synced))
        self.log.say(f"held-out at step {step}: loss {result['loss']:.4f}, answer-token accuracy "
                     f"{result['token_accuracy']:.1%}, exact match {result['correct']}/{result['num_generated']}")
        return result

    def final_before_parting(self, step: int) -> dict | None:
        """What the ranks measure together before they part (nothing: rank 0 does it after)."""
        return None

    def final_after_parting(self, step: int, result: dict | None) -> dict | None:
        """``eval.json`` on rank 0: ``result`` if measured before parting, else measured now."""
        return self.final(step, synced=False)

    def final(self, step: int, synced: bool) -> dict | None:
        """The trained model's task score and retention, and ``before`` (the model as loaded)."""
        if self.held_out is None and self.probe is None:
            return None
        with self.log.phase("evaluation after training", self._work()):
            return dict(self._measure(step, synced), before=self.before)

    def _measure(self, step: int, synced: bool, as_built: bool = False) -> dict:
        result = self.evaluate(step, synced) if self.held_out is not None else {"step": step}
        if self.probe is not None:
            result.update(self.probe.measure(self.model.model, synced=synced, as_built=as_built))
        return result

    def _work(self) -> str:
        """What an evaluation phase does, for the line that announces it."""
        work = []
        if self.held_out is not None:
            examples, prompts = self.held_out
            work.append(f"{len(examples)} held-out examples, {min(len(prompts), self.config.eval_max_examples)} "
                        "answers generated")
        if self.config.retention:
            work.append("retention on general text and prompts")
        return "; ".join(work)


class TogetherEvaluator(Evaluator):
    """Every rank measures; once the model is split (``synced``) they evaluate it together, before they part."""

    synced = True

    def __init__(self, model, tokenizer, held_out, config, is_main: bool, log):
        super().__init__(model, tokenizer, held_out, config, is_main, log)
        self.takes_part = True  # each rank needs the reference too

    def final_before_parting(self, step: int) -> dict | None:
        return self.final(step, synced=True)

    def final_after_parting(self, step: int, result: dict | None) -> dict | None:
        return result


class ClassificationEvaluator(Evaluator):
    """Classification data (``--method zo``): the task score is the accuracy of the candidates scored at the
    prompt's last position, and the mean cross-entropy over them (``lopt.measures.classification``)."""

    def __init__(self, model, tokenizer, held_out, config, is_main: bool, log):
        super().__init__(model, tokenizer, held_out, config, is_main, log)
        self.pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)

    def row(self, step: int) -> dict:
        if not self.takes_part:
            return {}
        result = self.evaluate(step, self.synced)
        return {"eval_loss": result["loss"], "accuracy": result["accuracy"]}

    def evaluate(self, step: int, synced: bool) -> dict:
        score = accuracy(self.model.model, self.held_out, self.config.batch_size, pad_token_id=self.pad_id)
        self.log.say(f"held-out at step {step}: accuracy {score.accuracy:.1%} of {score.count}, candidate loss "
                     f"{score.loss:.4f}")
        return dict(step=step, loss=score.loss, accuracy=score.accuracy, num_examples=score.count)

    def _work(self) -> str:
        work = [f"{len(self.held_out)} held-out examples scored"] if self.held_out is not None else []
        if self.config.retention:
            work.append("retention on general text and prompts")
        return "; ".join(work)
