"""``lopt.apply`` under the Hugging Face Trainer on 2 torchrun ranks (DDP, gloo): the one-process run.

The lower blocks' backward runs inside the forward, so DDP sees their parameters as unused and, told to look
for them (``ddp_find_unused_parameters``, the Trainer's default without checkpointing), averages their gradients
as they stand; the Trainer counts ``num_items_in_batch`` over the ranks and multiplies the task loss by their
number, and ``LoPTCallback`` does the same for the reconstruction loss. Ranks are forked from this process and
set what torchrun sets; the Trainer's accelerate joins them.
"""

import os
from types import SimpleNamespace

import pytest
import torch
from transformers import Trainer, TrainingArguments

import lopt
from lopt.models.shapes import build_model, tiny_config
from engine_helpers import Rows
from ranks import fork_ranks


class InOrder(Trainer):
    """The rows in order: one process's micro-batches 0..3 are the two ranks' 0, 2 and 1, 3 (accelerate deals
    each rank every other batch), so both runs see the same rows in each step."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def applied_model():
    hf = build_model(tiny_config("llama", num_hidden_layers=4), seed=0)
    lopt.apply(hf, num_blocks=2, kernels=False)
    return hf


def trained_weights(out, gradient_accumulation_steps: int, **extra) -> dict:
    hf = applied_model()
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=2, learning_rate=1e-2, max_steps=3,
                             gradient_accumulation_steps=gradient_accumulation_steps, report_to=[], use_cpu=True,
                             max_grad_norm=0.0, save_strategy="no", seed=0, dataloader_num_workers=0,
                             lr_scheduler_type="constant", disable_tqdm=True, **extra)
    trainer = InOrder(model=hf, args=args, train_dataset=Rows(hf.config.vocab_size, n=32, varied_prompts=True),
                      callbacks=[lopt.LoPTCallback(hf)])
    trainer.train()
    return {n: p.detach().clone() for n, p in hf.named_parameters()}


def sft_model():
    """A tiny Llama with the byte tokenizer's special tokens, after ``lopt.apply``, and the tokenizer."""
    from lopt.models.tokenizer import byte_tokenizer

    tokenizer = byte_tokenizer()
    config = tiny_config("llama", vocab_size=264, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    hf = build_model(config, seed=1)
    lopt.apply(hf, num_blocks=2, kernels=False)
    return hf, tokenizer


def sft_trained_weights(out, gradient_accumulation_steps: int) -> dict:
    """TRL's SFTTrainer (prompt-completion chat rows of unequal lengths), 3 steps, the rows in order."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    class InOrderSFT(SFTTrainer):
        _get_train_sampler = InOrder._get_train_sampler

    hf, tokenizer = sft_model()
    rows = [{"prompt": [{"role": "user", "content": f"Q{i}: " + "abc" * (i % 4)}],
             "completion": [{"role": "assistant", "content": "x" * (1 + i * 3 % 7)}]} for i in range(32)]
    args = SFTConfig(output_dir=str(out), max_steps=3, max_length=64, per_device_train_batch_size=2,
                     gradient_accumulation_steps=gradient_accumulation_steps, learning_rate=1e-2, max_grad_norm=0.0,
                     report_to=[], use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True, seed=0,
                     gradient_checkpointing=False, lr_scheduler_type="constant", dataloader_num_workers=0)
    InOrderSFT(model=hf, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
               callbacks=[lopt.LoPTCallback(hf)]).train()
    return {n: p.detach().clone() for n, p in hf.named_parameters()}


def on_two_ranks(out, train=trained_weights) -> list[int]:
    """``train`` with 2 micro-batches per rank and step on 2 forked ranks, each saving its weights."""

    def rank_run(rank, size, port):
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(size),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.save(train(out / f"rank{rank}", 2), out / f"weights{rank}.pt")

    return fork_ranks(rank_run)


def assert_same_weights(got: dict, expected: dict, start: dict, tolerance: float = 1e-4):
    """Every tensor within ``tolerance`` of its update, decoders included."""
    assert got.keys() == expected.keys() and any(n.startswith("lopt_decoders.") for n in got)
    for name, want in expected.items():
        update = (want - start[name]).norm()
        assert update > 0, name
        assert (got[name] - want).norm() <= tolerance * update, (name, ((got[name] - want).norm() / update))


def test_trainer_under_ddp_gives_the_one_process_weights(tmp_path):
    """3 steps of 8 rows with unequal label counts: one process with 4 micro-batches a step, and 2 ranks with 2
    each, end on the same weights (every tensor within 1e-4 of its update), the decoders included."""
    assert on_two_ranks(tmp_path) == [0, 0]
    start = {n: p.detach().clone() for n, p in applied_model().named_parameters()}
    one = trained_weights(tmp_path / "one", 4)
    for rank in range(2):
        assert_same_weights(torch.load(tmp_path / f"weights{rank}.pt"), one, start)


def test_trl_sft_trainer_under_ddp_gives_the_one_process_weights(tmp_path):
    """TRL calls the model without a token count, so each micro-batch's reconstruction loss weighs 1/GA; DDP's
    mean over 2 ranks of 2 makes it 1/4, one process's weight with 4: the same weights."""
    pytest.importorskip("trl")
    assert on_two_ranks(tmp_path, train=sft_trained_weights) == [0, 0]
    one = sft_trained_weights(tmp_path / "one", 4)
    start = {n: p.detach().clone() for n, p in sft_model()[0].named_parameters()}
    for rank in range(2):
        assert_same_weights(torch.load(tmp_path / f"weights{rank}.pt"), one, start)


@pytest.mark.parametrize("settings", [dict(ddp_find_unused_parameters=False),
                                      dict(ddp_find_unused_parameters=None, gradient_checkpointing=True)])
def test_trainer_under_ddp_without_the_unused_parameter_search_is_refused(settings):
    """Told not to look for unused parameters (or by the Trainer's default with checkpointing), DDP would leave
    the lower blocks' gradients unsummed: the callback refuses at the start of training."""
    hf = applied_model()
    args = SimpleNamespace(**{"world_size": 2, "gradient_accumulation_steps": 1, "average_tokens_across_devices": True,
                              "gradient_checkpointing": False, **settings})
    with pytest.raises(ValueError, match=r"LoPT under DDP needs TrainingArguments\(ddp_find_unused_parameters=True\)"):
        lopt.LoPTCallback(hf).on_train_begin(args, SimpleNamespace(global_step=0), None)
