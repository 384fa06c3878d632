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
from lopt.configs import build_model, tiny_config
from engine_helpers import Rows
from ranks import fork_ranks


class InOrder(Trainer):
    """The rows in order: one process's micro-batches 0..3 are the two ranks' 0, 2 and 1, 3 (accelerate deals
    each rank every other batch), so both runs see the same rows in each step."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def trained_weights(out, gradient_accumulation_steps: int, **extra) -> dict:
    hf = build_model(tiny_config("llama", num_hidden_layers=4), seed=0)
    lopt.apply(hf, num_blocks=2, kernels=False)
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=2, learning_rate=1e-2, max_steps=3,
                             gradient_accumulation_steps=gradient_accumulation_steps, report_to=[], use_cpu=True,
                             max_grad_norm=0.0, save_strategy="no", seed=0, dataloader_num_workers=0,
                             lr_scheduler_type="constant", disable_tqdm=True, **extra)
    trainer = InOrder(model=hf, args=args, train_dataset=Rows(hf.config.vocab_size, n=32, varied_prompts=True),
                      callbacks=[lopt.LoPTCallback(hf)])
    trainer.train()
    return {n: p.detach().clone() for n, p in hf.named_parameters()}


def on_two_ranks(out, **extra) -> list[int]:
    """``trained_weights`` with 2 micro-batches per rank and step on 2 forked ranks, each saving its weights."""

    def rank_run(rank, size, port):
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(size),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.save(trained_weights(out / f"rank{rank}", 2, **extra), out / f"weights{rank}.pt")

    return fork_ranks(rank_run)


def test_trainer_under_ddp_gives_the_one_process_weights(tmp_path):
    """3 steps of 8 rows with unequal label counts: one process with 4 micro-batches a step, and 2 ranks with 2
    each, end on the same weights (every tensor within 1e-4 of its update), the decoders included."""
    assert on_two_ranks(tmp_path) == [0, 0]
    start = {n: p.detach().clone() for n, p in lopt.apply(build_model(tiny_config("llama", num_hidden_layers=4),
                                                                      seed=0), num_blocks=2, kernels=False)
             .model.named_parameters()}
    start = {n.replace("aux_decoders", "lopt_decoders"): p for n, p in start.items()}
    one = trained_weights(tmp_path / "one", 4)
    ranks = [torch.load(tmp_path / f"weights{r}.pt") for r in range(2)]
    assert one.keys() == ranks[0].keys()
    assert any(n.startswith("lopt_decoders.") for n in one)
    for name, expected in one.items():
        update = (expected - start[name]).norm()
        assert update > 0, name
        for got in ranks:
            assert (got[name] - expected).norm() <= 1e-4 * update, (name, ((got[name] - expected).norm() / update))


@pytest.mark.parametrize("settings", [dict(ddp_find_unused_parameters=False),
                                      dict(ddp_find_unused_parameters=None, gradient_checkpointing=True)])
def test_trainer_under_ddp_without_the_unused_parameter_search_is_refused(settings):
    """Told not to look for unused parameters (or by the Trainer's default with checkpointing), DDP would leave
    the lower blocks' gradients unsummed: the callback refuses at the start of training."""
    hf = build_model(tiny_config("llama", num_hidden_layers=4), seed=0)
    lopt.apply(hf, num_blocks=2, kernels=False)
    args = SimpleNamespace(**{"world_size": 2, "gradient_accumulation_steps": 1, "average_tokens_across_devices": True,
                              "gradient_checkpointing": False, **settings})
    with pytest.raises(ValueError, match=r"LoPT under DDP needs TrainingArguments\(ddp_find_unused_parameters=True\)"):
        lopt.LoPTCallback(hf).on_train_begin(args, SimpleNamespace(global_step=0), None)
