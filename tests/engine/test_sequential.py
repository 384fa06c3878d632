"""``sequential_step``: one block at a time over all of a step's micro-batches.

Stale: the same gradients as ``train_step`` over the micro-batches (bitwise), and, with one optimizer per
block stepped as each block finishes, the same weights as the interleaved step after several steps.
Fresh: a hand-written two-stage loop with gradient accumulation (plain PyTorch over the HF modules).
"""

import copy

import pytest
import torch

import lopt
from lopt.models.shapes import build_model, tiny_config
from lopt_kernels import linear_cross_entropy_reference
from engine_helpers import grads, padded_batch

LR, LAMBDA = 3e-3, 10.0


def micro_batches(vocab_size, n=3, seed=0):
    return [padded_batch(vocab_size, seed=seed + i) for i in range(n)]


def totals(micro):
    return dict(total_tokens=sum((mb["labels"][:, 1:] != -100).sum() for mb in micro),
                total_positions=sum(mb["attention_mask"].sum() for mb in micro))


@pytest.mark.parametrize("num_blocks", [1, 2, 3])
def test_stale_gradients_equal_train_steps_bitwise(num_blocks):
    config = tiny_config("qwen2", num_hidden_layers=6, tie_word_embeddings=True)
    interleaved = lopt.LoPTModel(build_model(config), num_blocks=num_blocks, kernels=False)
    sequential = copy.deepcopy(interleaved)
    micro = micro_batches(config.vocab_size)
    outs = [interleaved.train_step(mb, **totals(micro)) for mb in micro]
    out = sequential.sequential_step(micro)
    expected = grads(interleaved)
    got = grads(sequential)
    assert got.keys() == expected.keys()
    for name, g in expected.items():
        assert torch.equal(got[name], g), name
    n_tokens = [o.num_tokens for o in outs]
    task = sum(o.task_loss * n for o, n in zip(outs, n_tokens)) / sum(n_tokens)
    torch.testing.assert_close(out.task_loss, task, rtol=1e-6, atol=0)
    assert out.num_tokens == sum(n_tokens)


def test_only_one_blocks_gradients_exist_at_a_time():
    config = tiny_config("llama", num_hidden_layers=6)
    m = lopt.LoPTModel(build_model(config), num_blocks=3, kernels=False)
    owners = m.block_param_groups(LR)
    seen = []

    def on_block_done(b):
        with_grad = [i for i, groups in enumerate(owners)
                     if any(p.grad is not None for g in groups for p in g["params"])]
        seen.append(with_grad)
        for g in owners[b]:
            for p in g["params"]:
                p.grad = None

    m.sequential_step(micro_batches(config.vocab_size), on_block_done=on_block_done)
    assert seen == [[0], [1]]


def test_stale_with_per_block_steps_equals_interleaved_over_several_steps():
    config = tiny_config("llama", num_hidden_layers=4)
    interleaved = lopt.LoPTModel(build_model(config), num_blocks=2, lambda_aux=LAMBDA, kernels=False)
    sequential = copy.deepcopy(interleaved)
    one = torch.optim.AdamW(interleaved.param_groups(LR), lr=LR)
    per_block = [torch.optim.AdamW(g, lr=LR) for g in sequential.block_param_groups(LR)]

    def on_block_done(b):
        per_block[b].step()
        per_block[b].zero_grad(set_to_none=True)

    for step in range(3):
        micro = micro_batches(config.vocab_size, seed=10 * step)
        for mb in micro:
            interleaved.train_step(mb, **totals(micro))
        one.step()
        one.zero_grad()
        sequential.sequential_step(micro, on_block_done=on_block_done)
        per_block[-1].step()
        per_block[-1].zero_grad()
    expected = dict(interleaved.named_parameters())
    for name, p in sequential.named_parameters():
        assert torch.equal(p, expected[name]), name


def reference_fresh_step(m, micro, optimizers):
    """The paper's described step with accumulation, written out: each lower block accumulates over every
    micro-batch, steps, and recomputes its outputs with the new weights; then the upper block."""
    hf = m.model
    t = totals(micro)

    def run(b, hidden, mb):
        seq = hidden.shape[1]
        return m.run_block(b, hidden, m.layer_inputs((hidden.shape[0], seq), "cpu", mb["attention_mask"]))

    inputs = [None] * len(micro)
    for b, decoder in enumerate(m.aux_decoders):
        for i, mb in enumerate(micro):
            hidden = hf.model.embed_tokens(mb["input_ids"]) if b == 0 else inputs[i]
            out = run(b, hidden, mb)
            aux = decoder.recon_loss(out, hidden.detach(), mb["attention_mask"].bool(), fused=False)
            share = mb["attention_mask"].sum() / t["total_positions"]  # the micro-batch's share of positions
            (aux * (share * LAMBDA / len(m.aux_decoders))).backward()
        optimizers[b].step()
        optimizers[b].zero_grad()
        with torch.no_grad():
            inputs = [run(b, hf.model.embed_tokens(mb["input_ids"]) if b == 0 else inputs[i], mb)
                      for i, mb in enumerate(micro)]
    for i, mb in enumerate(micro):
        normed = hf.model.norm(run(m.num_blocks - 1, inputs[i], mb))
        labels = torch.cat([mb["labels"][:, 1:], torch.full_like(mb["labels"][:, :1], -100)], dim=1)
        task = linear_cross_entropy_reference(normed.reshape(-1, normed.shape[-1]), hf.lm_head.weight,
                                              labels.reshape(-1))
        (task * ((labels != -100).sum() / t["total_tokens"])).backward()  # its share of label tokens
    optimizers[-1].step()
    optimizers[-1].zero_grad()


@pytest.mark.parametrize("num_blocks", [2, 3])
def test_fresh_with_accumulation_equals_the_two_stage_reference_bitwise(num_blocks):
    config = tiny_config("llama", num_hidden_layers=6)
    m = lopt.LoPTModel(build_model(config, seed=3), num_blocks=num_blocks, lambda_aux=LAMBDA, kernels=False)
    ref = copy.deepcopy(m)
    engine_opts = [torch.optim.AdamW(g, lr=LR) for g in m.block_param_groups(LR)]
    ref_opts = [torch.optim.AdamW(g, lr=LR) for g in ref.block_param_groups(LR)]

    def on_block_done(b):
        engine_opts[b].step()
        engine_opts[b].zero_grad()

    for step in range(3):
        micro = micro_batches(config.vocab_size, seed=10 * step)
        reference_fresh_step(ref, micro, ref_opts)
        m.sequential_step(micro, on_block_done=on_block_done, boundary="fresh")
        engine_opts[-1].step()
        engine_opts[-1].zero_grad()
    expected = dict(ref.named_parameters())
    for name, p in m.named_parameters():
        assert torch.equal(p, expected[name]), name


def test_fresh_differs_from_stale_and_needs_a_step():
    config = tiny_config("llama", num_hidden_layers=4)
    m = lopt.LoPTModel(build_model(config), num_blocks=2, kernels=False)
    with pytest.raises(ValueError, match="on_block_done"):
        m.sequential_step(micro_batches(config.vocab_size), boundary="fresh")
    with pytest.raises(ValueError, match="stale, fresh"):
        m.sequential_step(micro_batches(config.vocab_size), boundary="new")
