"""``boundary="fresh"``: the paper's described step against a hand-written two-stage reference.

The reference is a plain PyTorch loop over the Hugging Face modules: lower forward, reconstruction
loss, backward, the lower AdamW step, the boundary recomputed under no_grad with the updated lower
weights, then upper forward, task loss, backward, the upper AdamW step. The loss ops are the package's
pure-PyTorch references (``recon_loss_reference``, ``linear_cross_entropy_reference``): this file tests
the schedule, the op tests test the ops. Equality is bitwise (``torch.equal``) on fp32.
"""

import copy

import pytest
import torch

import lopt
from lopt.config import TrainConfig
from lopt.models.shapes import build_model, tiny_config
from lopt.errors import UsageError
from lopt.training.trainer import train
from lopt_kernels import linear_cross_entropy_reference

LR, LAMBDA, STEPS = 3e-3, 10.0, 4


def batches(vocab_size, n=STEPS, batch_size=3, seq_len=17):
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        input_ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=g)
        labels = input_ids.clone()
        labels[:, :5] = -100  # the prompt
        out.append(dict(input_ids=input_ids, labels=labels))
    return out


def reference_step(hf, decoders, lower_layers, upper_layers, lower_opt, upper_opt, batch):
    """One step of the paper's schedule, written out (no padding, so SDPA's causal mask)."""
    input_ids, labels = batch["input_ids"], batch["labels"]
    position_ids = torch.arange(input_ids.shape[1]).unsqueeze(0).expand(input_ids.shape[0], -1)

    def run(layers, hidden):
        cos_sin = hf.model.rotary_emb(hidden, position_ids)
        for layer in layers:
            hidden = layer(hidden, attention_mask=None, position_ids=position_ids, position_embeddings=cos_sin)
        return hidden

    # Stage 1: each lower block learns to reconstruct its input, steps, and hands on a fresh output.
    # Block 0 owns the embeddings, so its fresh output starts from the updated embeddings.
    hidden = hf.model.embed_tokens(input_ids)
    for b, (layers, decoder) in enumerate(zip(lower_layers, decoders)):
        block_input = hidden.detach()
        output = run(layers, hidden)
        (LAMBDA / len(decoders) * decoder.recon_loss(output, block_input, None, fused=False)).backward()
        lower_opt.step()
        lower_opt.zero_grad()
        with torch.no_grad():
            hidden = run(layers, hf.model.embed_tokens(input_ids) if b == 0 else block_input)
    # Stage 2: the upper block learns the task on that boundary.
    output = run(upper_layers, hidden)
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    normed = hf.model.norm(output)
    loss = linear_cross_entropy_reference(normed.reshape(-1, normed.shape[-1]), hf.lm_head.weight, shifted.reshape(-1))
    (loss * 1.0).backward()
    upper_opt.step()
    upper_opt.zero_grad()


def engine_run(m, data, boundary):
    optimizers = [torch.optim.AdamW(groups, lr=LR, weight_decay=0.0) for groups in m.block_param_groups(LR)]

    def on_boundary(b):
        optimizers[b].step()
        optimizers[b].zero_grad()

    for batch in data:
        m.train_step(batch, on_boundary=on_boundary, boundary=boundary)
        optimizers[-1].step()
        optimizers[-1].zero_grad()
    return dict(m.model.named_parameters())


@pytest.mark.parametrize("num_blocks", [2, 3])
def test_fresh_boundary_equals_the_two_stage_reference_bitwise(num_blocks):
    config = tiny_config("llama", num_hidden_layers=6)
    data = batches(config.vocab_size)
    m = lopt.LoPTModel(build_model(config, seed=3), num_blocks=num_blocks, lambda_aux=LAMBDA, kernels=False)
    ref = copy.deepcopy(m)  # the same untied weights and decoders, driven by the loop above instead

    hf = ref.model
    layer_groups = [list(hf.model.layers[s:e]) for s, e in ref.block_ranges]
    lower = [*hf.model.embed_tokens.parameters(), *ref.aux_decoders.parameters(),
             *(p for layers in layer_groups[:-1] for layer in layers for p in layer.parameters())]
    upper = [*(p for layer in layer_groups[-1] for p in layer.parameters()), *hf.model.norm.parameters(),
             *hf.lm_head.parameters()]
    assert len(lower) + len(upper) == len(list(ref.parameters()))
    lower_opt = torch.optim.AdamW(lower, lr=LR, weight_decay=0.0)
    upper_opt = torch.optim.AdamW(upper, lr=LR, weight_decay=0.0)
    for batch in data:
        reference_step(hf, ref.aux_decoders, layer_groups[:-1], layer_groups[-1], lower_opt, upper_opt, batch)

    # One optimizer over all lower blocks (the reference) or one per block (the engine): AdamW is per
    # parameter, so that is the same arithmetic.
    fresh = engine_run(m, data, "fresh")
    expected = dict(hf.named_parameters())
    for name, p in fresh.items():
        assert torch.equal(p, expected[name]), name


def test_the_stale_boundary_is_not_the_reference():
    """The comparison above can fail: the released code's order gives other upper-block weights."""
    config = tiny_config("llama", num_hidden_layers=4)
    data = batches(config.vocab_size)
    m = lopt.LoPTModel(build_model(config, seed=3), num_blocks=2, lambda_aux=LAMBDA, kernels=False)
    stale, fresh = engine_run(copy.deepcopy(m), data, "stale"), engine_run(m, data, "fresh")
    upper = "model.layers.3.self_attn.q_proj.weight"
    lower = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(stale[upper], fresh[upper])
    assert torch.equal(stale[lower], fresh[lower])  # the lower half's update does not depend on the order


def test_fresh_needs_a_lower_step_and_a_known_name():
    config = tiny_config("llama", num_hidden_layers=4)
    m = lopt.LoPTModel(build_model(config), num_blocks=2, kernels=False)
    batch = batches(config.vocab_size, n=1)[0]
    with pytest.raises(ValueError, match="on_boundary"):
        m.train_step(batch, boundary="fresh")
    with pytest.raises(ValueError, match="stale, fresh"):
        m.train_step(batch, boundary="new")


def test_trainer_fresh_boundary_runs_and_refuses_grad_accum(tmp_path, tiny_model_dir):
    import json

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i} " * (1 + i % 3), "answer": "a" * (1 + i % 4)}) + "\n"
                            for i in range(8)))
    common = dict(model=tiny_model_dir, data=str(data), seq_len=32, batch_size=4, save_every=0, lr=3e-3)
    summary = train(TrainConfig(output_dir=str(tmp_path / "fresh"), max_steps=2, boundary="fresh", **common))
    assert summary["status"] == "completed" and summary["steps"] == 2
    with pytest.raises(UsageError, match="--boundary fresh.*--grad-accum 1"):
        train(TrainConfig(output_dir=str(tmp_path / "accum"), max_steps=1, boundary="fresh", grad_accum=2, **common))
