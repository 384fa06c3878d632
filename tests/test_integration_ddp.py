"""``lopt.apply`` under the Hugging Face Trainer on 2 torchrun ranks (DDP, gloo): the one-process run.

The lower blocks' backward runs inside the forward, so DDP sees their parameters as unused and, told to look
for them (``ddp_find_unused_parameters``, the Trainer's default without checkpointing), averages their gradients
as they stand; the Trainer counts ``num_items_in_batch`` over the ranks and multiplies the task loss by their
number, and ``LoPTCallback`` does the same for the reconstruction loss. Ranks are forked from this process and
set what torchrun sets; the Trainer's accelerate joins them.
"""

import os
import traceback
from types import SimpleNamespace

import pytest
import torch
from transformers import Trainer, TrainingArguments

import lopt
from lopt.configs import build_model, tiny_config
from ranks import free_port


class Rows(torch.utils.data.Dataset):
    """Rows of unequal label counts (prompts of 2-6 tokens masked), so the token weighting matters."""

    def __init__(self, vocab_size, n=32, seq_len=12):
        g = torch.Generator().manual_seed(0)
        self.input_ids = torch.randint(0, vocab_size, (n, seq_len), generator=g)

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, i):
        labels = self.input_ids[i].clone()
        labels[: 2 + i % 5] = -100
        return dict(input_ids=self.input_ids[i], attention_mask=torch.ones_like(labels), labels=labels)


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
    trainer = InOrder(model=hf, args=args, train_dataset=Rows(hf.config.vocab_size),
                      callbacks=[lopt.LoPTCallback(hf)])
    trainer.train()
    return {n: p.detach().clone() for n, p in hf.named_parameters()}


def on_two_ranks(out, **extra) -> list[int]:
    """``trained_weights`` with 2 micro-batches per rank and step on 2 forked ranks; rank 0 saves them."""
    port = free_port()
    pids = []
    for rank in range(2):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                                  MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
                weights = trained_weights(out / f"rank{rank}", 2, **extra)
                torch.save(weights, out / f"weights{rank}.pt")
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        pids.append(pid)
    return [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]


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
