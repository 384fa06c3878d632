"""TRL's SFTTrainer and GRPOTrainer, unmodified, on a model after ``lopt.apply`` (CPU, a tiny Llama).

Both trainers call the model and backpropagate their own loss. LoPT's claim is that the lower block learns
only from its reconstruction loss, whose backward runs inside the forward, and the trainer's backward
reaches the upper block only. ``GradientProbe`` checks that on every micro-batch by when each gradient
appears: during the forward (the lower parameters', and only theirs), or after it, before the next forward or
the optimizer step, when only the trainer's backward runs (the upper parameters', and only theirs).
"""

import math

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer  # noqa: E402

import lopt  # noqa: E402
from lopt.models.shapes import build_model, tiny_config  # noqa: E402
from lopt.engine.model import IGNORE_INDEX  # noqa: E402
from lopt.models.tokenizer import byte_tokenizer  # noqa: E402

GRAD_ACCUM = 2

# What every run here shares. fp32 (TRL turns bf16 autocast on by default) keeps the CPU run fast; TRL's
# default gradient checkpointing stays on, so the layers recompute inside LoPT's blocks. No clipping: the
# Trainer clips before on_pre_optimizer_step, which would rescale the gradients the probe compares.
TRAINER_ARGS = dict(per_device_train_batch_size=2, gradient_accumulation_steps=GRAD_ACCUM, learning_rate=1e-3,
                    max_grad_norm=0.0, logging_steps=1, report_to=[], use_cpu=True, bf16=False, save_strategy="no",
                    disable_tqdm=True, seed=0)


def tiny_lopt_model():
    """A 4-layer Llama (hidden 64) with the byte tokenizer's special tokens, split into two LoPT blocks."""
    tokenizer = byte_tokenizer()
    config = tiny_config("llama", vocab_size=264, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    model = build_model(config, seed=1)
    engine = lopt.apply(model, num_blocks=2)
    return model, engine, tokenizer


def _grads(params: dict) -> dict:
    return {name: None if p.grad is None else p.grad.detach().clone() for name, p in params.items()}


def _grew(before, after) -> bool:
    """Whether a gradient changed in between (None counts as zeros)."""
    if after is None:
        return False
    return not torch.equal(after, torch.zeros_like(after) if before is None else before)


class GradientProbe(TrainerCallback):
    """Records, for every training micro-batch, which parameters' gradients grew during the model's forward
    and which grew afterwards (in the trainer's backward), and checks that LoPT splits them as it claims."""

    def __init__(self, model, engine):
        lower = {id(p) for p in engine.lower_parameters()}
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.lower = {n: p for n, p in params if id(p) in lower}
        self.upper = {n: p for n, p in params if id(p) not in lower}
        self.training_forwards = 0
        self.trainer_backwards = 0
        self.no_grad_forwards = 0
        self.inputs = []  # the keyword arguments of every training forward
        self._at_forward_start = None
        self._at_forward_end = None  # set from a training forward's return until the trainer's backward is checked
        model.register_forward_pre_hook(self._forward_start, with_kwargs=True)
        model.register_forward_hook(self._forward_end)

    def _forward_start(self, module, args, kwargs):
        if not (torch.is_grad_enabled() and module.training):
            self.no_grad_forwards += 1
            return
        self.check_trainer_backward()
        self.inputs.append(dict(kwargs))
        self._at_forward_start = _grads({**self.lower, **self.upper})

    def _forward_end(self, module, args, output):
        if not (torch.is_grad_enabled() and module.training):
            return
        now = _grads({**self.lower, **self.upper})
        grew = {n for n in now if _grew(self._at_forward_start[n], now[n])}
        assert grew >= set(self.lower), f"the reconstruction loss gave no gradient to {sorted(set(self.lower) - grew)}"
        assert not grew & set(self.upper), f"LoPT's in-forward backward reached {sorted(grew & set(self.upper))}"
        self._at_forward_end = now
        self.training_forwards += 1

    def check_trainer_backward(self):
        """What the trainer's backward of its loss added since the last training forward returned."""
        if self._at_forward_end is None:
            return
        now = _grads({**self.lower, **self.upper})
        grew = {n for n in now if _grew(self._at_forward_end[n], now[n])}
        assert not grew & set(self.lower), f"the trainer's loss reached {sorted(grew & set(self.lower))}"
        assert grew >= set(self.upper), f"the trainer's loss gave no gradient to {sorted(set(self.upper) - grew)}"
        self._at_forward_end = None
        self.trainer_backwards += 1

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.check_trainer_backward()  # the step's last micro-batch: no next forward comes before the step


def _block_weights(model, engine) -> dict:
    """A copy of the weights the test expects to move: lower block (with the embeddings) and upper block."""
    (lower_start, lower_end), (_, upper_end) = engine.block_ranges
    weights = {"embed_tokens": model.model.embed_tokens.weight, "lm_head": model.lm_head.weight,
               "norm": model.model.norm.weight}
    for i in range(lower_start, upper_end):
        block = "lower" if i < lower_end else "upper"
        weights.update({f"{block}.layers.{i}.{n}": p for n, p in model.model.layers[i].named_parameters()})
    return {n: p.detach().clone() for n, p in weights.items()}


def _assert_all_moved(model, engine, before: dict):
    after = _block_weights(model, engine)
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert not unchanged, f"never updated: {unchanged}"


def _assert_lopt_logged(log_history, steps: int):
    rows = [r for r in log_history if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for r in rows:
        assert math.isfinite(r["loss"]) and r["task_loss"] == r["loss"]
        assert math.isfinite(r["aux_loss"]) and r["aux_loss"] > 0


def _prompt_and_completion(input_ids, labels, assistant: int):
    """Checks one example's labels: -100 up to and including the <|assistant|> token that ends the prompt,
    then the completion's own tokens."""
    prompt_end = int((input_ids == assistant).nonzero()[0]) + 1
    assert (labels[:prompt_end] == IGNORE_INDEX).all(), "the prompt is in the loss"
    assert len(labels) > prompt_end and torch.equal(labels[prompt_end:], input_ids[prompt_end:])


SFT_CASES = {
    "padded": {},
    # Padding-free packing: one row of several examples, position_ids restarting at each, no attention_mask.
    "packed": dict(packing=True),
    # The upper block's input is the detached boundary, which a reentrant checkpoint would leave untrained.
    "reentrant-checkpointing": dict(gradient_checkpointing_kwargs={"use_reentrant": True}),
}


@pytest.mark.parametrize("case", SFT_CASES)
def test_sft_trainer_completion_only_chat(tmp_path, case):
    """SFTTrainer on prompt/completion chat data: the prompt is masked, the lower block learns from its
    reconstruction loss alone, the upper block from the task loss, over 3 steps of 2 micro-batches."""
    model, engine, tokenizer = tiny_lopt_model()
    rows = [{"prompt": [{"role": "user", "content": f"Q{i}: " + "abc" * (i % 4)}],
             "completion": [{"role": "assistant", "content": "x" * (1 + i * 3 % 7)}]} for i in range(48)]
    probe = GradientProbe(model, engine)
    before = _block_weights(model, engine)
    steps = 3
    args = SFTConfig(output_dir=str(tmp_path), max_steps=steps, max_length=64, **SFT_CASES[case], **TRAINER_ARGS)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         callbacks=[lopt.LoPTCallback(model), probe])
    trainer.train()

    assert probe.training_forwards == probe.trainer_backwards == steps * GRAD_ACCUM
    _assert_lopt_logged(trainer.state.log_history, steps)
    _assert_all_moved(model, engine, before)

    # Completion-only loss reached the model, example by example.
    assistant = tokenizer.convert_tokens_to_ids("<|assistant|>")
    for batch in probe.inputs:
        if case == "packed":
            assert "attention_mask" not in batch
            (input_ids,), (labels,), (position_ids,) = batch["input_ids"], batch["labels"], batch["position_ids"]
            starts = (position_ids == 0).nonzero().flatten().tolist()
            assert len(starts) > 2  # several examples in the row
            for start, end in zip(starts, starts[1:] + [len(input_ids)]):
                _prompt_and_completion(input_ids[start:end], labels[start:end], assistant)
            continue
        for input_ids, labels, real in zip(batch["input_ids"], batch["labels"], batch["attention_mask"].bool()):
            _prompt_and_completion(input_ids[real], labels[real], assistant)
            assert (labels[~real] == IGNORE_INDEX).all()

    # On TRL's batch, LoPT's training forward computes the model's own hidden states (packed rows: attention
    # and positions stay within each example).
    batch = {k: v for k, v in probe.inputs[0].items() if k not in ("labels", "fused_lm_head")}
    model.train()
    lopt_hidden = model.model(**batch).last_hidden_state.detach()
    with torch.no_grad():
        own_hidden = model.model(**batch).last_hidden_state
    real = batch["attention_mask"].bool() if "attention_mask" in batch else slice(None)
    torch.testing.assert_close(lopt_hidden[real], own_hidden[real])


def test_grpo_trainer_policy_loss_upper_only(tmp_path, monkeypatch):
    """GRPOTrainer with a tiny reward: generation runs the model's own forward under no_grad, the policy loss
    reaches the upper block only, the lower block learns from its reconstruction loss; 3 steps."""
    model, engine, tokenizer = tiny_lopt_model()
    lopt_forwards = []
    lower_blocks = engine.lower_blocks

    def counted_lower_blocks(*args, **kwargs):  # LoPT's block walk: runs in training forwards only
        lopt_forwards.append(torch.is_grad_enabled())
        return lower_blocks(*args, **kwargs)

    monkeypatch.setattr(engine, "lower_blocks", counted_lower_blocks)

    def mean_token_id(completion_ids, **kwargs):  # distinct for almost any two completions: advantages != 0
        return [sum(ids) / len(ids) if ids else 0.0 for ids in completion_ids]

    probe = GradientProbe(model, engine)
    before = _block_weights(model, engine)
    steps = 3
    args = GRPOConfig(output_dir=str(tmp_path), max_steps=steps, num_generations=2, max_completion_length=8,
                      beta=0.0, **TRAINER_ARGS)
    trainer = GRPOTrainer(model=model, reward_funcs=mean_token_id, args=args, processing_class=tokenizer,
                          train_dataset=Dataset.from_list([{"prompt": f"count to {i}:"} for i in range(4)]),
                          callbacks=[lopt.LoPTCallback(model), probe])
    trainer.train()

    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert all(r["completions/mean_length"] > 0 and r["reward_std"] > 0 for r in rows)
    # Generation (once per step here) called the model under no_grad and never entered LoPT's block walk,
    # which ran exactly once per training forward.
    assert probe.no_grad_forwards >= steps
    assert probe.training_forwards == probe.trainer_backwards == steps * GRAD_ACCUM
    assert lopt_forwards == [True] * (steps * GRAD_ACCUM)
    _assert_lopt_logged(trainer.state.log_history, steps)
    _assert_all_moved(model, engine, before)


class FirstStepGrads(TrainerCallback):
    """The gradients of the first optimizer step, just before it (no clipping: max_grad_norm=0)."""

    def __init__(self, model):
        self.model, self.grads = model, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}


def test_sft_trainer_gives_train_steps_gradients():
    """One micro-batch per step: SFTTrainer's step (TRL's fused head, its own loss normalisation, the
    reconstruction loss at weight 1) has the gradients of ``LoPTModel.train_step`` on the same batch."""
    import copy
    import tempfile

    model, engine, tokenizer = tiny_lopt_model()
    twin = copy.deepcopy(engine)  # the same weights and decoders, driven by train_step
    rows = [{"prompt": [{"role": "user", "content": f"Q{i}: " + "abc" * (i % 4)}],
             "completion": [{"role": "assistant", "content": "x" * (1 + i * 3 % 7)}]} for i in range(8)]
    probe, grads = GradientProbe(model, engine), FirstStepGrads(model)
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, max_steps=1, max_length=64,
                         **{**TRAINER_ARGS, "gradient_accumulation_steps": 1})
        SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                   callbacks=[grads, probe]).train()
    (batch,) = probe.inputs
    twin.model.train()
    twin.train_step({k: batch[k] for k in ("input_ids", "attention_mask", "labels")})
    expected = {n: p.grad for n, p in twin.model.named_parameters() if p.grad is not None}  # decoders included
    got = grads.grads
    assert got.keys() == expected.keys() and any(n.startswith("lopt_decoders.") for n in got)
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-7, msg=name)
