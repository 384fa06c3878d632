"""PEFT LoRA adapters on a LoPT model (``lopt.apply`` on a ``get_peft_model`` result), on the CPU.

The supported order is ``get_peft_model`` first, then ``lopt.apply``: PEFT freezes every parameter it did not
add, so applied the other way round it freezes the decoders, and with ``target_modules="all-linear"`` it
also wraps their linears in adapters. The in-forward schedule refuses such a model when its lower block
trains (the last tests).

The tiny Llama has 4 layers split into blocks [0, 2) and [2, 4): layers 2 and 3 are the upper block.
"""

import copy
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

import lopt
from lopt.models.shapes import build_model, tiny_config
from lopt.engine.integration import DECODERS, DECODERS_FILE, engine_of
from lopt.engine.model import split_layers

NUM_LAYERS = 4
LOWER, UPPER = (list(range(*r)) for r in split_layers(NUM_LAYERS, 2))
TARGETS = ["q_proj", "v_proj", "down_proj"]


def config():
    return tiny_config("llama", num_hidden_layers=NUM_LAYERS)


def peft_model(layers=None, target_modules=TARGETS, base=None):
    """The tiny Llama with LoRA adapters on ``layers`` (None: every layer). ``init_lora_weights=False``
    draws B at random too, so A gets a non-zero gradient from the first step."""
    base = build_model(config(), seed=0) if base is None else base
    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, layers_to_transform=layers,
                      init_lora_weights=False)
    return get_peft_model(base, lora)


def padded_batch(batch_size=3, seq_len=13, seed=0):
    """Right-padded rows of different lengths; padding is ignored in the labels."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, config().vocab_size, (batch_size, seq_len), generator=g)
    attention_mask = torch.ones_like(input_ids)
    for row in range(1, batch_size):
        attention_mask[row, seq_len - 3 * row:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def layer_of(name):
    """The decoder layer index in a parameter's name, or None (embeddings, final norm, head, decoders)."""
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


def is_adapter(name):
    return "lora_" in name


def is_decoder(name):
    return f"{DECODERS}." in name


def grads(model, keep):
    return {n: p.grad.clone() for n, p in model.named_parameters() if keep(n) and p.grad is not None}


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(model, before):
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


def train_steps(model, batch, steps=3, lr=1e-2):
    """A hand-written loop: forward with labels, the model's loss, backward, AdamW over what requires grad."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def assert_same_grads(actual, expected, **tolerance):
    assert actual.keys() == expected.keys()
    for name in expected:
        assert expected[name].abs().max() > 0, name
        torch.testing.assert_close(actual[name], expected[name], msg=name, **tolerance)


def test_lora_on_the_upper_block_trains_the_upper_adapters_with_the_end_to_end_gradient():
    """Upper adapters' gradients after one forward + backward equal those of the same LoRA model run
    through its own forward with the lower half detached (a pre-hook on layer 2 detaches its input).

    That reference is exact, not an approximation: the stop-gradient only cuts what flows below the
    boundary, so the upper parameters' gradient of the task loss is the same with or without it. The
    two runs differ only in who builds the attention mask, hence the fp32 tolerance of rounding.
    """
    model = peft_model(UPPER)
    reference = copy.deepcopy(model)

    def detach_input(module, args, kwargs):
        if args:
            return (args[0].detach(), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach()}

    reference.get_base_model().model.layers[UPPER[0]].register_forward_pre_hook(detach_input, with_kwargs=True)
    engine = lopt.apply(model, num_blocks=2)
    assert engine.block_ranges == [(LOWER[0], LOWER[-1] + 1), (UPPER[0], UPPER[-1] + 1)]

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "no trainable parameter"
    assert all(is_decoder(n) or (is_adapter(n) and layer_of(n) in UPPER) for n in trainable), trainable
    lower_names = [n for n, _ in model.named_parameters() if layer_of(n) in LOWER or "embed_tokens" in n]
    assert lower_names and not any(is_adapter(n) for n in lower_names)  # the lower block has no adapters
    assert not any(n in trainable for n in lower_names)  # nor any trainable base weight

    batch = padded_batch()
    model.train()
    reference.train()
    loss = model(**batch).loss
    loss.backward()
    reference_loss = reference(**batch).loss
    reference_loss.backward()
    torch.testing.assert_close(loss, reference_loss)
    upper = grads(model, is_adapter)
    assert {layer_of(n) for n in upper} == set(UPPER)
    assert_same_grads(upper, grads(reference, is_adapter))
    assert all(p.grad is None for n, p in model.named_parameters() if n in lower_names)
    assert grads(model, is_decoder), "the decoders got no gradient from the reconstruction loss"

    model.zero_grad(set_to_none=True)
    before = snapshot(model)
    train_steps(model, batch)
    assert changed(model, before) == trainable  # every upper adapter and the decoders moved, nothing else


def test_lora_on_both_blocks_trains_the_lower_adapters_by_the_reconstruction_loss_alone():
    """The in-forward step's gradients against ``engine.objective`` (the paper's one-graph objective) on the
    same weights and batch: the lower adapters' and decoders' gradients equal those of ``lambda_aux * aux``
    alone (the same lower-block code and weight, so equal to rounding), the upper adapters' those of the
    task loss alone. The base weights never change. The embeddings carry an adapter too: block 0 owns
    them, so it learns from the reconstruction loss."""
    model = peft_model(target_modules=TARGETS + ["embed_tokens"])
    engine = lopt.apply(model, num_blocks=2)
    layers_with_adapters = {layer_of(n) for n, _ in model.named_parameters() if is_adapter(n)}
    assert layers_with_adapters == set(LOWER + UPPER) | {None}  # None: the embeddings' adapter
    assert all(p.requires_grad for p in engine.aux_decoders.parameters())

    batch = padded_batch()
    model.train()
    model(**batch).loss.backward()
    lower = grads(model, lambda n: is_decoder(n) or (is_adapter(n) and (layer_of(n) in LOWER or "embed" in n)))
    upper = grads(model, lambda n: is_adapter(n) and layer_of(n) in UPPER)
    assert {layer_of(n) for n in upper} == set(UPPER) and {layer_of(n) for n in lower} == set(LOWER) | {None}
    assert any("embed_tokens" in n for n in lower) and any(is_decoder(n) for n in lower)

    model.zero_grad(set_to_none=True)
    _, task_loss, aux_loss = engine.objective(batch)
    (engine.lambda_aux * aux_loss).backward()
    assert not grads(model, lambda n: layer_of(n) in UPPER)  # the reconstruction loss stops at the boundary
    assert_same_grads(grads(model, lambda n: n in lower), lower, rtol=1e-6, atol=1e-8)

    model.zero_grad(set_to_none=True)
    task_loss.backward()
    assert not grads(model, lambda n: n in lower)  # the task loss stops at the boundary
    assert_same_grads(grads(model, lambda n: n in upper), upper)

    model.zero_grad(set_to_none=True)
    before = snapshot(model)
    train_steps(model, batch)
    moved = changed(model, before)
    assert moved == {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(lower) <= moved and set(upper) <= moved
    assert not any(model.get_parameter(n).requires_grad for n in before if not (is_adapter(n) or is_decoder(n)))


class FirstStepGrads(TrainerCallback):
    """Keeps the gradients the Trainer's first optimizer step is about to apply."""

    def __init__(self, model):
        self.model, self.grads = model, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.grads is None:
            self.grads = grads(self.model, lambda n: True)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "reentrant-checkpointing"])
@pytest.mark.parametrize("layers", [UPPER, None], ids=["upper-block", "both-blocks"])
def test_trainer_trains_lora_with_lopt_gradients_and_saves_adapters_and_decoders(tmp_path, layers, checkpointing):
    """Under an unmodified Trainer (its default ``remove_unused_columns``, two micro-batches per step) the
    first step's gradients equal those of one backward of ``engine.objective`` on all four rows, taken
    before training from the same weights. Rows of equal length with every token but the first labelled give each
    micro-batch the same share of label tokens and of positions, so the Trainer's scaling
    (``num_items_in_batch``) and the objective's mean agree. Also with the Trainer's reentrant gradient
    checkpointing, where a layer's weights get gradients only if its input requires grad (the detached
    boundary does not). Its checkpoints are PEFT's (adapter files) with the decoders beside them."""
    model = peft_model(layers)
    engine = lopt.apply(model, num_blocks=2)
    g = torch.Generator().manual_seed(3)
    # The first label masked: nothing predicts it, and so every transformers version counts the same label
    # tokens for num_items_in_batch (5.0 counts the unshifted labels, later ones the shifted).
    rows = []
    for ids in torch.randint(0, config().vocab_size, (4, 11), generator=g):
        labels = ids.clone()
        labels[0] = -100
        rows.append(dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels))
    full_batch = {k: torch.stack([row[k] for row in rows]) for k in rows[0]}

    model.train()
    engine.objective(full_batch)[0].backward()
    expected = grads(model, lambda n: True)
    assert expected.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    before = snapshot(model)
    first_step = FirstStepGrads(model)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=2,
                             per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2,
                             max_grad_norm=0.0, logging_steps=1, save_strategy="steps", save_steps=2,
                             gradient_checkpointing=checkpointing,
                             gradient_checkpointing_kwargs={"use_reentrant": True})
    trainer = Trainer(model=model, args=args, train_dataset=rows,
                      callbacks=[lopt.LoPTCallback(model), first_step])
    trainer.train()

    assert_same_grads(first_step.grads, expected, rtol=1e-5, atol=1e-7)
    assert changed(model, before) == expected.keys()  # adapters and decoders moved, base weights did not
    logged = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logged) == 2 and all(row["aux_loss"] > 0 for row in logged)

    checkpoint = tmp_path / "checkpoint-2"
    files = set(os.listdir(checkpoint))
    assert {"adapter_model.safetensors", "adapter_config.json", DECODERS_FILE} <= files
    assert "model.safetensors" not in files
    with safe_open(checkpoint / "adapter_model.safetensors", "pt") as f:
        assert f.keys() and all(is_adapter(k) and not is_decoder(k) for k in f.keys())
    with safe_open(checkpoint / DECODERS_FILE, "pt") as f:
        for k, v in engine.aux_decoders.state_dict().items():
            assert torch.equal(f.get_tensor(k), v)


def eval_logits(model, input_ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_adapters_save_reload_and_merge_into_a_plain_checkpoint(tmp_path):
    """``save_pretrained`` of the PEFT model writes adapter files only; ``PeftModel.from_pretrained`` on a
    fresh base gives the trained model's logits; ``merge_and_unload`` then ``save_pretrained`` writes a
    plain Hugging Face checkpoint (no adapter, no decoder key) that ``AutoModelForCausalLM`` reloads."""
    model = peft_model()
    lopt.apply(model, num_blocks=2)
    batch = padded_batch()
    train_steps(model, batch, steps=2)
    input_ids = batch["input_ids"]
    trained = eval_logits(model, input_ids)
    assert not torch.allclose(trained, eval_logits(build_model(config(), seed=0), input_ids), atol=1e-4)

    model.save_pretrained(tmp_path / "adapter")
    files = set(os.listdir(tmp_path / "adapter"))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    assert not files & {"model.safetensors", DECODERS_FILE}
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert len(keys) == sum(is_adapter(n) for n, _ in model.named_parameters())
    assert all(is_adapter(k) and not is_decoder(k) for k in keys)
    reloaded = PeftModel.from_pretrained(build_model(config(), seed=0), tmp_path / "adapter")
    torch.testing.assert_close(eval_logits(reloaded, input_ids), trained)

    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert keys == set(build_model(config(), seed=0).state_dict())  # a plain checkpoint, key for key
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not hasattr(plain, DECODERS)
    torch.testing.assert_close(eval_logits(plain, input_ids), trained)
    lopt.remove(merged)  # the merged model still carried LoPT (decoders, forwards) until now
    assert set(merged.state_dict()) == keys
    torch.testing.assert_close(eval_logits(merged, input_ids), trained)


def test_lopt_apply_before_get_peft_model_works_when_only_the_upper_block_trains():
    """PEFT then freezes the decoders, but nothing below the boundary trains, so nothing is lost: the
    upper adapters get the gradient they get in the supported order (same weights, same batch)."""
    base = build_model(config(), seed=0)
    lopt.apply(base, num_blocks=2)
    model_first = peft_model(UPPER, base=base)
    assert not any(p.requires_grad for p in engine_of(model_first).aux_decoders.parameters())
    model_after = peft_model(UPPER)
    lopt.apply(model_after, num_blocks=2)

    batch = padded_batch()
    for m in (model_first, model_after):
        m.train()
        m(**batch).loss.backward()
    assert_same_grads(grads(model_first, is_adapter), grads(model_after, is_adapter), rtol=0, atol=0)


@pytest.mark.parametrize("target_modules", [TARGETS, "all-linear"])
def test_lopt_apply_before_get_peft_model_is_refused_when_the_lower_block_trains(target_modules):
    """With adapters below the boundary, PEFT's freezing of the decoders (and, for ``all-linear``, its
    adapters on their linears) would train the lower block against a fixed random decoder: the training
    forward says which order to use. Eval and no-grad forwards still run; the supported order trains."""
    base = build_model(config(), seed=0)
    lopt.apply(base, num_blocks=2)
    model = peft_model(target_modules=target_modules, base=base)
    batch = padded_batch()
    model.train()
    with pytest.raises(ValueError, match="after get_peft_model"):
        model(**batch)
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)

    model = peft_model(target_modules=target_modules)
    engine = lopt.apply(model, num_blocks=2)
    assert not any(is_adapter(n) for n, _ in engine.aux_decoders.named_parameters())
    model.train()
    model(**batch).loss.backward()
    assert all(p.grad is not None for p in engine.aux_decoders.parameters())
