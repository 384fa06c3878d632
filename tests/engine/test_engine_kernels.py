"""The engine with lopt_kernels (kernels=True): same gradients and same loss curve as the plain path.

On the CPU the kernels run through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""

import pytest
import torch

import lopt
import lopt_kernels
from lopt.models.shapes import build_model, tiny_config
from engine_helpers import grads, padded_batch, rel_err

pytestmark = pytest.mark.skipif(
    lopt_kernels.current_backend("cpu") != "triton" and not torch.cuda.is_available(),
    reason="needs Triton (interpreter on the CPU)",
)


def make(family, kernels, num_blocks=2, hidden_size=96, vocab_size=777):
    config = tiny_config(family, num_hidden_layers=4, hidden_size=hidden_size, vocab_size=vocab_size)
    return lopt.LoPTModel(build_model(config, seed=1), num_blocks=num_blocks, kernels=kernels), config


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_kernels_give_the_same_gradients(family):
    plain, config = make(family, kernels=False)
    fused, _ = make(family, kernels=True)
    fused.load_state_dict(plain.state_dict())
    batch = padded_batch(config.vocab_size, seq_len=21)

    out_plain = plain.train_step(batch)
    out_fused = fused.train_step(batch)
    torch.testing.assert_close(out_fused.loss, out_plain.loss, rtol=1e-5, atol=1e-6)
    expected = grads(plain)
    got = grads(fused)
    assert got.keys() == expected.keys()
    for name in expected:
        assert rel_err(got[name], expected[name]) <= 1e-4, name


def test_kernels_patch_the_model_and_save_plain_checkpoints(tmp_path):
    fused, config = make("llama", kernels=True)
    plain_keys = set(build_model(config).state_dict())
    assert set(fused.model.state_dict()) == plain_keys
    fused.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, fused(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernels", [False, True])
def test_an_adapted_head_runs_as_a_module_never_skipped(kernels):
    config = tiny_config("llama", num_hidden_layers=2)
    hf = build_model(config)

    class LoraLinear(torch.nn.Module):  # the shape of a PEFT-adapted head
        def __init__(self, base):
            super().__init__()
            self.base_layer = base
            self.lora_A = torch.nn.Linear(base.in_features, 4, bias=False)
            self.lora_B = torch.nn.Linear(4, base.out_features, bias=False)
            self.weight = base.weight

        def forward(self, x):
            return self.base_layer(x) + self.lora_B(self.lora_A(x))

    hf.lm_head = LoraLinear(hf.lm_head)
    m = lopt.LoPTModel(hf, num_blocks=2, kernels=kernels)
    ids = torch.randint(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        expected = hf(input_ids=ids, labels=ids).loss  # the model's own loss, through the adapter
    out = m.train_step({"input_ids": ids})
    torch.testing.assert_close(out.task_loss, expected, rtol=1e-5, atol=1e-6)
    assert hf.lm_head.lora_A.weight.grad is not None and hf.lm_head.lora_B.weight.grad.abs().sum() > 0


def test_thirty_steps_give_the_same_loss_curve():
    curves = []
    for kernels in (False, True):
        m, config = make("llama", kernels=kernels, hidden_size=64, vocab_size=64)
        opt = torch.optim.AdamW(m.param_groups(lr=1e-2), lr=1e-2)
        g = torch.Generator().manual_seed(0)
        # A learnable stream: each row counts up from a random start, so the loss falls fast.
        starts = torch.randint(0, config.vocab_size, (30, 4, 1), generator=g)
        curve = []
        for step in range(30):
            ids = (starts[step] + torch.arange(16)) % config.vocab_size
            out = m.train_step({"input_ids": ids})
            opt.step()
            opt.zero_grad(set_to_none=True)
            curve.append(out.task_loss.item())
        curves.append(torch.tensor(curve))
    plain, fused = curves
    assert plain[-5:].mean() < 0.75 * plain[:5].mean()  # it learns
    torch.testing.assert_close(fused, plain, rtol=2e-3, atol=2e-3)
