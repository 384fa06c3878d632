"""``lopt.apply``: the LoPT step inside the model's forward, alone and under the Hugging Face Trainer."""

import copy
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

import lopt
from lopt.models.shapes import build_model, tiny_config
from lopt.engine.integration import DECODERS_FILE, engine_of
from benchmarks.e2e.bytecount import SavedActivationPeak
from engine_helpers import FAMILIES, Rows, padded_batch

BLOCKS = 2


def lopt_and_twin(family="llama", num_layers=4, **apply_kwargs):
    """A model after ``lopt.apply`` and a ``LoPTModel`` twin with the same weights and decoders."""
    config = tiny_config(family, num_hidden_layers=num_layers, tie_word_embeddings=FAMILIES[family])
    hf = build_model(config)
    twin = lopt.LoPTModel(copy.deepcopy(hf), num_blocks=BLOCKS, kernels=False)
    engine = lopt.apply(hf, num_blocks=BLOCKS, kernels=False, **apply_kwargs)
    twin.aux_decoders.load_state_dict(engine.aux_decoders.state_dict())
    return hf, twin


def engine_names(named: dict) -> dict:
    """Rename the applied model's parameters (or their gradients) as the ``LoPTModel`` twin names them."""
    return {("aux_" + n[len("lopt_"):] if n.startswith("lopt_decoders.") else "model." + n): v for n, v in named.items()}


def grads_by_engine_name(hf):
    return engine_names({n: p.grad for n, p in hf.named_parameters() if p.grad is not None})


def assert_same_grads(got: dict, expected_module, rtol=1e-6):
    expected = {n: p.grad for n, p in expected_module.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys()
    for name, g in expected.items():
        err = ((got[name] - g).norm() / g.norm().clamp(min=1e-30)).item()
        assert err <= rtol, (name, err)


def label_count(batch):
    return (batch["labels"][:, 1:] != -100).sum()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_forward_and_backward_give_train_steps_gradients(family):
    hf, twin = lopt_and_twin(family)
    batch = padded_batch(hf.config.vocab_size)
    hf.train()
    out = hf(**batch, num_items_in_batch=label_count(batch))
    out.loss.backward()
    step = twin.train_step(batch)
    torch.testing.assert_close(out.loss.detach(), step.task_loss, rtol=1e-6, atol=0)
    assert_same_grads(grads_by_engine_name(hf), twin, rtol=0 if family == "llama" else 1e-6)


def test_the_task_loss_reaches_the_upper_block_only():
    hf, _ = lopt_and_twin()
    engine = engine_of(hf)
    hf.train()
    out = hf(**padded_batch(hf.config.vocab_size))
    lower = engine.lower_parameters()
    after_forward = [p.grad.clone() for p in lower]
    assert all(g.abs().sum() > 0 for g in after_forward)  # the local backward ran inside forward
    assert all(p.grad is None for p in engine.upper_parameters())
    out.loss.backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(lower, after_forward))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in engine.upper_parameters())


def test_accumulated_micro_batches_give_the_large_batchs_gradients():
    """Four unpadded micro-batches with the Trainer's ``num_items_in_batch`` (the whole step's label
    tokens) give one large batch's gradients, and those of ``train_step`` with the step's totals."""
    hf, twin = lopt_and_twin("qwen3")
    large_model = copy.deepcopy(hf)
    g = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, hf.config.vocab_size, (4, 13), generator=g)
    labels = input_ids.clone()
    labels[:, :5] = -100  # every row's prompt masked alike: label tokens are a fixed share of positions
    large = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels)
    micro = [{k: v[i:i + 1] for k, v in large.items()} for i in range(4)]
    total_tokens = label_count(large)
    hf.train()
    for mb in micro:
        hf(**mb, num_items_in_batch=total_tokens).loss.backward()
        twin.train_step(mb, total_tokens=total_tokens, total_positions=large["attention_mask"].sum())
    large_model.train()
    large_model(**large, num_items_in_batch=total_tokens).loss.backward()
    expected = grads_by_engine_name(large_model)
    for name, grad in grads_by_engine_name(hf).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7)
    assert_same_grads(grads_by_engine_name(hf), twin, rtol=1e-5)


def test_without_num_items_the_local_loss_is_divided_by_the_accumulation_count():
    """GRPO-style trainers divide their own loss by the accumulation count; the local loss must match."""
    hf, twin = lopt_and_twin(gradient_accumulation_steps=3)
    batch = padded_batch(hf.config.vocab_size)
    hf.train()
    hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    twin.train_step(batch, loss_scale=1 / 3)
    got = grads_by_engine_name(hf)
    lower = [(n, p) for n, p in twin.named_parameters() if any(p is q for q in twin.lower_parameters())]
    assert lower and got.keys() == {n for n, _ in lower}  # no task loss yet: the lower block's gradients only
    for name, p in lower:
        torch.testing.assert_close(got[name], p.grad, rtol=1e-6, atol=0)


def test_eval_no_grad_and_generate_are_the_models_own():
    config = tiny_config("qwen2", num_hidden_layers=4, tie_word_embeddings=False)
    hf = build_model(config)
    reference = copy.deepcopy(hf)
    lopt.apply(hf, num_blocks=BLOCKS, kernels=False)
    batch = padded_batch(config.vocab_size)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        hf.train()  # no grad: the model's own forward even in training mode
        assert torch.equal(hf(**inputs).logits, reference(**inputs).logits)
    hf.eval()
    reference.eval()
    assert torch.equal(hf(**inputs).logits, reference(**inputs).logits)
    prompt = batch["input_ids"][:1, :5]
    out = hf.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out, reference.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0))
    assert all(p.grad is None for p in hf.parameters())


def test_training_logits_equal_the_models_own():
    hf, _ = lopt_and_twin("mistral")
    reference = copy.deepcopy(hf)
    lopt.remove(reference)
    batch = padded_batch(hf.config.vocab_size)
    hf.train()
    reference.train()
    torch.testing.assert_close(hf(**batch).logits, reference(**batch).logits, rtol=1e-5, atol=1e-6)


def test_saves_a_plain_checkpoint(tmp_path):
    hf, _ = lopt_and_twin("qwen2")
    hf.train()
    hf(**padded_batch(hf.config.vocab_size)).loss.backward()
    with torch.no_grad():  # head and embeddings now differ, as after training
        hf.lm_head.weight.add_(0.01 * hf.lm_head.weight.grad.sign())
    hf.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not any("lopt" in k for k in reloaded.state_dict())
    batch = padded_batch(hf.config.vocab_size)
    hf.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, hf(**batch).logits, rtol=0, atol=1e-6)


def test_remove_restores_the_model():
    hf, _ = lopt_and_twin()
    with pytest.raises(ValueError, match="already applied"):
        lopt.apply(hf)
    lopt.remove(hf)
    assert "lopt_decoders" not in dict(hf.named_modules())
    assert "forward" not in hf.__dict__ and "forward" not in hf.model.__dict__
    hf.train()
    hf(**padded_batch(hf.config.vocab_size)).loss.backward()  # plain end-to-end: every layer gets the task's gradient
    assert all(p.grad is not None for p in hf.model.layers[0].parameters())
    with pytest.raises(ValueError, match="not applied"):
        lopt.remove(hf)


def test_bad_uses_are_refused():
    with pytest.raises(ValueError, match="unsupported architecture"):
        lopt.apply(torch.nn.Linear(2, 2))
    hf, _ = lopt_and_twin()
    hf.train()
    batch = padded_batch(hf.config.vocab_size)
    with pytest.raises(ValueError, match="attention_mask"):
        hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"][:, None, None, :])
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        lopt.apply(build_model(tiny_config("llama")), gradient_accumulation_steps=0)


def test_torch_compile_gives_the_same_gradients():
    hf, twin = lopt_and_twin()
    batch = padded_batch(hf.config.vocab_size)
    compiled = torch.compile(hf, backend="eager")  # dynamo traces around the in-forward backward
    compiled.train()
    compiled(**batch).loss.backward()
    twin.train_step(batch)
    assert_same_grads(grads_by_engine_name(hf), twin, rtol=1e-6)


# ---------------------------------------------------------------- the Hugging Face Trainer


class RecordSteps(TrainerCallback):
    """Each optimizer step's gradients (before the step) and the micro-batches that made them."""

    def __init__(self, model):
        self.model, self.batches, self.steps, self._pending = model, [], [], []
        model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            self._pending.append({k: kwargs[k].clone() for k in ("input_ids", "attention_mask", "labels")})

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.steps.append({n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None})
        self.batches.append(self._pending)
        self._pending = []


def trainer_args(tmp_path, **kwargs):
    defaults = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                    learning_rate=1e-3, max_steps=3, logging_steps=1, report_to=[], use_cpu=True,
                    max_grad_norm=0.0, save_strategy="no", seed=0, dataloader_num_workers=0,
                    lr_scheduler_type="constant", disable_tqdm=True)
    return TrainingArguments(**{**defaults, **kwargs})


def test_trainer_gives_train_steps_gradients_and_logs_both_losses(tmp_path):
    hf, twin = lopt_and_twin()
    recorder = RecordSteps(hf)
    trainer = Trainer(model=hf, args=trainer_args(tmp_path, max_steps=1), train_dataset=Rows(hf.config.vocab_size),
                      callbacks=[lopt.LoPTCallback(hf), recorder])
    trainer.train()
    (got,), (micro,) = recorder.steps, recorder.batches
    assert len(micro) == 2
    large = {k: torch.cat([mb[k] for mb in micro]) for k in micro[0]}
    for mb in micro:
        twin.train_step(mb, total_tokens=label_count(large), total_positions=large["attention_mask"].sum())
    assert_same_grads(engine_names(got), twin, rtol=1e-5)
    logged = [row for row in trainer.state.log_history if "aux_loss" in row]
    assert logged and logged[0]["task_loss"] == logged[0]["loss"] and logged[0]["aux_loss"] > 0


def test_trainer_checkpoints_resume_exactly(tmp_path):
    def run(output_dir, max_steps, resume=None, init_from=None):
        hf, _ = lopt_and_twin()
        if init_from is not None:
            hf.load_state_dict(init_from.state_dict())
        trainer = Trainer(model=hf, train_dataset=Rows(hf.config.vocab_size), callbacks=[lopt.LoPTCallback(hf)],
                          args=trainer_args(output_dir, max_steps=max_steps, save_strategy="steps", save_steps=2))
        trainer.train(resume_from_checkpoint=resume)
        return hf

    straight = run(tmp_path / "straight", 4)
    run(tmp_path / "resumed", 2)
    assert (tmp_path / "resumed" / "checkpoint-2" / DECODERS_FILE).is_file()
    fresh = lopt_and_twin()[0]
    with torch.no_grad():  # a different start: only the checkpoint can make the two runs agree
        for p in fresh.parameters():
            p.add_(1.0)
    resumed = run(tmp_path / "resumed", 4, resume=True, init_from=fresh)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_trainer_saved_activation_peak_is_at_most_0_6_of_plain(tmp_path):
    def peak(apply_lopt):
        config = tiny_config("llama", hidden_size=128, num_hidden_layers=8, vocab_size=64)
        hf = build_model(config)
        if apply_lopt:
            lopt.apply(hf, num_blocks=BLOCKS, kernels=False)
        trainer = Trainer(model=hf, args=trainer_args(tmp_path, per_device_train_batch_size=4),
                          train_dataset=Rows(config.vocab_size, seq_len=64))
        batch = next(iter(trainer.get_train_dataloader()))
        meter = SavedActivationPeak(hf)
        with meter.hooks:
            trainer.training_step(hf, batch, num_items_in_batch=label_count(batch))
        assert meter.current == 0
        return meter.peak

    assert peak(True) <= 0.6 * peak(False)
