"""LoPT inside any trainer: ``lopt.apply(model)``, then the Hugging Face Trainer, TRL or a hand-written loop.

The stop-gradient at each boundary means a lower block's backward needs nothing from above it, so it can
run during the forward. After ``apply``, a training-mode forward with grad enabled runs, for each lower
block, its layers, its reconstruction loss and that loss's backward (lower weights get their gradients
there and then), and hands the detached output on; the upper block runs as usual and the model returns its
normal output, so the caller's ``loss.backward()`` reaches the upper block only. A trainer that calls
``model(**batch)`` and ``loss.backward()`` so gets the LoPT step and its memory (lower blocks' activations
die at their boundary) without knowing it. Under ``torch.no_grad()``, in eval mode and in ``generate`` the
forward is the model's own. How the reconstruction loss is scaled: ``_weigh_local_loss``; how to use it
with the Trainer, TRL, PEFT and DDP: docs/integration.md.
"""

from __future__ import annotations

import functools
import json
import os
import types
import warnings

import torch
import torch.nn as nn
from transformers import TrainerCallback

from lopt.engine.model import IGNORE_INDEX, LoPTModel

DECODERS = "lopt_decoders"
DECODERS_FILE = "lopt_decoders.safetensors"


def apply(
    model: nn.Module,
    num_blocks: int = 2,
    lambda_aux: float = 10.0,
    *,
    recompute: str = "none",
    kernels: bool | None = None,
    gradient_accumulation_steps: int = 1,
) -> LoPTModel:
    """Make ``model`` (a Llama / Qwen2 / Qwen3 / Mistral causal LM, or a PEFT model around one) train with
    LoPT, in place. Returns the engine: ``.aux_decoders``, ``.lower_parameters()``, ``.param_groups()``,
    ``.train_step()``. ``remove(model)`` undoes it. With PEFT, apply to the model ``get_peft_model`` returns:
    applied before it, PEFT freezes the decoders.

    The decoders sit in the model as ``lopt_decoders``, so optimizers, ``.to()`` and DDP see them, and are
    listed in ``_keys_to_ignore_on_save``: ``save_pretrained`` writes a plain checkpoint. ``LoPTCallback``
    keeps them in the Trainer's checkpoints (``lopt_decoders.safetensors``) and loads them on resume."""
    hf_model = _causal_lm(model)
    if DECODERS in hf_model._modules:
        raise ValueError("LoPT is already applied to this model; lopt.remove(model) first to change its settings")
    if gradient_accumulation_steps < 1:
        raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
    engine = LoPTModel(hf_model, num_blocks=num_blocks, lambda_aux=lambda_aux, recompute=recompute, kernels=kernels)
    engine.gradient_accumulation_steps = gradient_accumulation_steps
    engine.data_parallel_ranks = 1  # LoPTCallback: the torchrun ranks that DDP averages over
    engine.aux_losses_since_log = None  # a list once LoPTCallback logs them
    hf_model.add_module(DECODERS, engine.aux_decoders)
    # Plain attributes (the engine holds the model, not the reverse) and bound methods, so a deepcopy of
    # the model (TRL's reference model, for one) gets its own engine and forwards.
    hf_model.__dict__["_lopt"] = hf_model.model.__dict__["_lopt"] = engine
    hf_model.__dict__["_lopt_ignored_on_save"] = hf_model._keys_to_ignore_on_save
    hf_model._keys_to_ignore_on_save = set(hf_model._keys_to_ignore_on_save or ()) | {
        f"{DECODERS}.{k}" for k in engine.aux_decoders.state_dict()}
    # Hooks, not a new forward, on the causal LM: they run whatever forward is installed (TRL's fused head
    # replaces it and calls the decoder stack itself).
    engine.hooks = [hf_model.register_forward_pre_hook(_weigh_local_loss, with_kwargs=True),
                    hf_model.register_forward_hook(_forget_weight, always_call=True)]
    hf_model.model.forward = _bound(_decoder_forward, hf_model.model)
    return engine


def remove(model: nn.Module) -> None:
    """Undo ``apply``: the model's own forward again and no decoders (untied embeddings stay untied)."""
    hf_model = _causal_lm(model)
    engine = hf_model.__dict__.pop("_lopt", None)
    if engine is None:
        raise ValueError("LoPT is not applied to this model")
    del hf_model._modules[DECODERS]
    hf_model._keys_to_ignore_on_save = hf_model.__dict__.pop("_lopt_ignored_on_save")
    for hook in engine.hooks:
        hook.remove()
    del hf_model.model.forward, hf_model.model.__dict__["_lopt"]  # the class's forward again
    if engine.kernels:
        import lopt_kernels

        lopt_kernels.unpatch(hf_model)


def engine_of(model: nn.Module) -> LoPTModel:
    """The engine ``apply`` attached to ``model`` (or to the causal LM inside it)."""
    engine = _causal_lm(model).__dict__.get("_lopt")
    if engine is None:
        raise ValueError("LoPT is not applied to this model: call lopt.apply(model) first")
    return engine


def _causal_lm(model: nn.Module) -> nn.Module:
    """The Hugging Face causal LM itself: unwraps DDP / torch.compile / PEFT wrappers."""
    for attr in ("module", "_orig_mod"):
        while hasattr(model, attr) and isinstance(getattr(model, attr), nn.Module):
            model = getattr(model, attr)
    if hasattr(model, "get_base_model"):  # peft.PeftModel
        model = model.get_base_model()
    return model


def _bound(fn, module: nn.Module):
    """``fn`` as ``module``'s forward, showing the class forward's signature: the Trainer reads it to keep
    the dataset columns the model takes and to decide whether to pass ``num_items_in_batch``."""

    @functools.wraps(type(module).forward)
    def forward(self, *args, **kwargs):
        return fn(self, *args, **kwargs)

    return types.MethodType(forward, module)


def _training(engine: LoPTModel) -> bool:
    return torch.is_grad_enabled() and engine.model.training and engine.num_blocks > 1


def _weigh_local_loss(module, args, kwargs):
    """Before the causal LM's forward: this micro-batch's weight for the reconstruction loss.

    Its backward runs inside the forward, before the trainer scales the task loss, so it is scaled here:

    - given ``labels`` and ``num_items_in_batch`` (the Hugging Face Trainer passes the optimizer step's
      label-token count to causal LMs with labels; the model then sums its cross-entropy and divides by it),
      each micro-batch's mean reconstruction loss is weighted by its share of those tokens,
      ``label tokens in this micro-batch / num_items_in_batch``;
    - otherwise ``1 / gradient_accumulation_steps``, set by ``apply`` or by ``LoPTCallback`` from the
      trainer's args. That is TRL 1.16's case: SFTTrainer and GRPOTrainer call the model through TRL's fused
      head with no token count and normalise their loss themselves (SFT by the step's label tokens, GRPO's
      default ``dapo`` by its completion tokens), so micro-batches are weighted equally here. The two agree
      when micro-batches hold equal numbers of label tokens (packed rows of one length nearly do). In a
      window cut short at an epoch's end the Trainer divides by the window's length, LoPT by the full count.

    ``LoPTModel.train_step`` weights each micro-batch by its share of the step's *positions*; with
    ``num_items_in_batch`` the two agree whenever label tokens are the same fraction of positions in every
    micro-batch (always with one micro-batch per step)."""
    engine = module.__dict__["_lopt"]
    if not _training(engine):
        return
    labels, num_items = kwargs.get("labels"), kwargs.get("num_items_in_batch")
    if labels is not None and num_items is not None:  # the task loss is sum(CE) / num_items
        tokens = (labels[..., 1:] != IGNORE_INDEX).sum()
        share = tokens / torch.as_tensor(num_items, device=tokens.device).clamp(min=1)
        engine.aux_scale = share * engine.data_parallel_ranks  # DDP averages what the ranks' shares sum
    else:  # the trainer divides the task loss by the accumulation count
        engine.aux_scale = 1.0 / engine.gradient_accumulation_steps


def _forget_weight(module, args, output):
    module.__dict__["_lopt"].__dict__.pop("aux_scale", None)


def _decoder_forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                     use_cache=None, **kwargs):
    """The decoder stack's forward; in training: lower blocks with their local backward, then the upper block."""
    engine = self.__dict__["_lopt"]
    if not _training(engine):
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
    from transformers.modeling_outputs import BaseModelOutputWithPast

    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError("LoPT's training forward starts from the first token: it takes no filled cache "
                         "(generate under torch.no_grad() or in eval mode)")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError("LoPT's training forward takes a [batch, seq] attention_mask (1 = real token), "
                         f"got {attention_mask.dim()} dimensions")
    _check_decoders_learn(engine)
    hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
    document_ids = None
    if position_ids is not None and attention_mask is None:  # packed rows: positions restart per example
        document_ids = (position_ids == 0).cumsum(dim=-1).expand(hidden.shape[:2])
    layer_inputs = engine.layer_inputs(hidden.shape[:2], hidden.device, attention_mask, document_ids, position_ids)
    positions = attention_mask.bool() if attention_mask is not None else None
    scale = getattr(engine, "aux_scale", 1.0 / engine.gradient_accumulation_steps)
    hidden, aux_losses = engine.lower_blocks(hidden, layer_inputs, positions, aux_weight=scale)
    if engine.aux_losses_since_log is not None:
        engine.aux_losses_since_log.append(torch.stack(aux_losses).mean())
    hidden = self.norm(engine.run_block(engine.num_blocks - 1, hidden, layer_inputs))
    return BaseModelOutputWithPast(last_hidden_state=hidden)


def _check_decoders_learn(engine: LoPTModel) -> None:
    """Refuse decoders that cannot learn while a lower block does: run after ``apply``, PEFT's ``get_peft_model``
    freezes every parameter it did not add, the decoders too, and ``all-linear`` wraps their linears."""
    decoders = engine.aux_decoders
    wrapped = any(type(m).__module__.startswith("peft.") for m in decoders.modules())
    frozen = not all(p.requires_grad for p in decoders.parameters())
    if wrapped or (frozen and any(p.requires_grad for p in engine.lower_parameters())):
        raise ValueError("LoPT's reconstruction decoders are frozen or wrapped in adapters while the lower blocks "
                         "train (PEFT does that when get_peft_model runs after lopt.apply): call "
                         "lopt.apply(peft_model) after get_peft_model")


def save_decoders(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write the decoders (and the settings they belong to) to ``directory/lopt_decoders.safetensors``."""
    from safetensors.torch import save_file

    engine = engine_of(model)
    state = {k: v.detach().contiguous().cpu() for k, v in engine.aux_decoders.state_dict().items()}
    settings = dict(num_blocks=engine.num_blocks, lambda_aux=engine.lambda_aux, block_ranges=engine.block_ranges)
    save_file(state, os.path.join(directory, DECODERS_FILE), metadata={"lopt": json.dumps(settings)})


def load_decoders(model: nn.Module, directory: str | os.PathLike) -> bool:
    """Load decoders written by ``save_decoders``; False when ``directory`` has none."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = os.path.join(directory, DECODERS_FILE)
    if not os.path.isfile(path):
        return False
    engine = engine_of(model)
    with safe_open(path, "pt") as f:
        settings = json.loads(f.metadata()["lopt"])
    if settings["block_ranges"] != [list(r) for r in engine.block_ranges]:
        raise ValueError(f"{path} holds decoders for blocks {settings['block_ranges']}, "
                         f"this model is split as {engine.block_ranges}")
    engine.aux_decoders.load_state_dict(load_file(path))
    return True


def _check_data_parallel(args) -> None:
    """The Trainer under torchrun (DDP): the lower blocks' gradients, made in their backward inside the forward,
    are not in the graph of the loss, so DDP must be told to look for unused parameters (it then averages their
    gradients as they stand); the Trainer turns that off when gradient checkpointing is on."""
    find_unused = args.ddp_find_unused_parameters
    if find_unused is None:
        find_unused = not (args.gradient_checkpointing or getattr(args, "activation_checkpointing", False))
    if not find_unused:
        raise ValueError("LoPT under DDP needs TrainingArguments(ddp_find_unused_parameters=True): the lower "
                         "blocks learn in their own backward, during the forward, which DDP sees as unused "
                         "parameters and sums only when told to look for them")


class LoPTCallback(TrainerCallback):
    """For the Hugging Face Trainer and TRL: logs ``aux_loss``, takes the accumulation count from the
    trainer's args, and keeps the decoders in checkpoints (saved beside them, loaded on resume)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.engine = engine_of(model)
        self.engine.aux_losses_since_log = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.engine.gradient_accumulation_steps = args.gradient_accumulation_steps
        if args.world_size > 1:
            _check_data_parallel(args)
        # Under DDP the Trainer counts num_items_in_batch over all ranks and multiplies the loss by their number,
        # since DDP averages the gradients: the reconstruction loss, weighted by that count, needs the same.
        self.engine.data_parallel_ranks = args.world_size if args.average_tokens_across_devices else 1
        if state.global_step > 0:  # resumed: the Trainer names its checkpoints checkpoint-<step>
            checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if not load_decoders(self.model, checkpoint):
                warnings.warn(f"LoPT: resumed at step {state.global_step} but {checkpoint} holds no "
                              f"{DECODERS_FILE}; the reconstruction decoders restart from their initial weights")

    def on_save(self, args, state, control, **kwargs):
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if args.should_save and os.path.isdir(checkpoint):
            save_decoders(self.model, checkpoint)

    def on_log(self, args, state, control, logs=None, **kwargs):
        losses = self.engine.aux_losses_since_log
        if logs is None or not losses or "loss" not in logs:
            return
        aux_loss = torch.stack(losses).float().mean().item()
        losses.clear()
        # ``loss`` is the task loss (what the model returns); the objective adds lambda * aux.
        extra = dict(task_loss=logs["loss"], aux_loss=round(aux_loss, 6))
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)
