"""ZO inside the Hugging Face Trainer and over PEFT LoRA: ``ZOTrainer`` and ``build_engine``.

``ZOTrainer`` is a ``transformers.Trainer`` whose optimizer step is one ``ZOEngine.step``: the same code,
settings, seed stream and batches as a direct run of the engine (what ``lopt train --method zo`` runs), so
the two give the same weights. Everything else is the Trainer's: data loading, epochs, the learning-rate
schedule, logging, evaluation, checkpoints, resume and callbacks.

Why a subclass and not a callback (LoPT's ``LoPTCallback`` pattern): a callback runs around the Trainer's
step, never instead of it, and ZO must replace the step's core: no autograd forward, no ``backward``, no
optimizer update and no AdamW state (the memory ZO exists to avoid). ``training_step`` and
``create_optimizer`` are the Trainer's documented extension points, and MeZO's own code is a Trainer
subclass. Over a ``PeftModel`` (``build_engine``) only the adapters' ``lora_A`` / ``lora_B`` linears train.
How the Trainer's settings map onto the engine, the batches it takes, what is refused: docs/zo-integration.md.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import torch
from torch import nn
from transformers import Trainer

from lopt.engine.integration import _causal_lm
from lopt.zo.engine import ZOEngine, ZOSettings, ZOStepOutput

ZO_STATE_FILE = "zo_state.pt"
# The batch keys the engine reads (``lopt.zo.scoring``): kept by the Trainer's remove_unused_columns.
ZO_COLUMNS = ("input_ids", "attention_mask", "labels", "document_ids", "last_index", "candidate_ids", "label")


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def build_engine(model: nn.Module, settings: ZOSettings | None = None, *, kernels: bool | None = None,
                 **engine_kwargs) -> ZOEngine:
    """A ``ZOEngine`` over ``model``: a Hugging Face causal LM (its decoder layers' linears train), or a PEFT
    model around one (only its LoRA ``lora_A`` / ``lora_B`` linears train; the base stays frozen). What
    ``ZOTrainer`` trains with, and the engine a direct run over the same model must use to match it."""
    hf_model = _causal_lm(model)
    if not is_peft_model(model):
        return ZOEngine(hf_model, settings, kernels=kernels, **engine_kwargs)
    _check_lora(hf_model)
    engine = ZOEngine(hf_model, settings, kernels=kernels, select=_peft_trainable, **engine_kwargs)
    trained = {lin.name for lin in engine.linears}
    left = [n for n, p in hf_model.named_parameters() if p.requires_grad and n not in trained]
    if left:
        shown = ", ".join(left[:4]) + (f" (and {len(left) - 4} more)" if len(left) > 4 else "")
        raise ValueError(f"ZO over PEFT trains the LoRA lora_A / lora_B linears of decoder layers >= first_layer "
                         f"({engine.settings.first_layer}) only, but these trainable parameters would stay as they "
                         f"are: {shown}. Drop them from the PEFT config (lora_bias, use_dora, modules_to_save, "
                         "embedding targets) or lower ZOSettings.first_layer")
    return engine


def _peft_trainable(name: str, module: nn.Linear) -> bool:
    """A linear PEFT left trainable: an active adapter's lora_A / lora_B (the wrapped base linear is frozen)."""
    return module.weight.requires_grad


def _check_lora(hf_model: nn.Module) -> None:
    for name, module in hf_model.named_modules():
        if getattr(module, "merged", False):
            raise ValueError(f"ZO over PEFT: the adapter of {name} is merged into its base weight, so its LoRA "
                             "linears take no part in the forward: unmerge_adapter() first")
        if getattr(module, "lora_variant", None):
            raise ValueError(f"ZO over PEFT: {name} uses a LoRA variant ({', '.join(module.lora_variant)}: "
                             f"{type(next(iter(module.lora_variant.values()))).__name__}); the engine perturbs "
                             "lora_A / lora_B as plain linears and supports vanilla LoRA only")


class ZONoOptimizer(torch.optim.Optimizer):
    """What the Trainer's scheduler drives under ZO: one parameterless group holding the learning rate.
    ``step`` does nothing (the engine has updated the weights); there is never any state."""

    def __init__(self, lr: float):
        super().__init__([{"params": []}], {"lr": lr})

    def step(self, closure=None):
        return None


class ZOTrainer(Trainer):
    """A ``transformers.Trainer`` that trains ``model`` (a causal LM, or a PEFT LoRA model) by zeroth-order
    steps of a ``ZOEngine`` (``self.engine``) under ``zo`` settings; see docs/zo-integration.md.
    ``kernels``: the engine's (default: the Triton kernels on CUDA)."""

    def __init__(self, model: nn.Module | None = None, args=None, *, zo: ZOSettings | None = None,
                 kernels: bool | None = None, **kwargs):
        optimizers = kwargs.get("optimizers", (None, None))
        if optimizers[0] is not None or kwargs.get("optimizer_cls_and_kwargs") is not None:
            raise ValueError("ZOTrainer takes no optimizer: the ZO engine updates the weights (the Trainer's "
                             "scheduler still sets its learning rate)")
        if kwargs.get("model_init") is not None:
            raise ValueError("ZOTrainer needs the model itself (model_init is not supported)")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("ZOTrainer's loss is the engine's (causal LM, or classification over candidates): "
                             "compute_loss_func is not supported")
        super().__init__(model=model, args=args, **kwargs)
        args = self.args
        if args.world_size > 1 or args.n_gpu > 1:
            raise ValueError("ZOTrainer runs in one process on one device (world_size and n_gpu 1): each rank "
                             "would update from its own loss difference and the replicas would drift apart "
                             "(on a machine with several GPUs, set CUDA_VISIBLE_DEVICES to one)")
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError("ZOTrainer does not run under DeepSpeed or FSDP")
        if args.fp16:
            raise ValueError("ZOTrainer does not take fp16=True (its gradient scaler needs gradients, ZO makes "
                             "none): load the model in the dtype to train in")
        if args.bf16:
            warnings.warn("ZOTrainer ignores bf16=True: the engine scores in the model's own dtype (load the "
                          "model in bfloat16 for a bf16 run; the update stays in fp32 masters)", stacklevel=2)
        self.engine = build_engine(self.model, self._zo_settings(zo), kernels=kernels)
        self._zo_pending: list[dict] = []  # the micro-batches of the optimizer step in progress
        self._zo_pending_step: int | None = None
        self._zo_outputs: list[ZOStepOutput] = []  # the steps since the last log

    def _zo_settings(self, zo: ZOSettings | None) -> ZOSettings:
        args, default = self.args, ZOSettings()
        zo = zo or ZOSettings(seed=args.seed)
        for name, trainer_value in (("lr", args.learning_rate), ("weight_decay", args.weight_decay)):
            value = getattr(zo, name)
            if value != getattr(default, name) and value != trainer_value:
                arg = "learning_rate" if name == "lr" else name
                raise ValueError(f"ZOSettings.{name}={value} but TrainingArguments.{arg}={trainer_value}: under "
                                 f"ZOTrainer the Trainer's {arg} (and its scheduler) rule; set it there")
        return dataclasses.replace(zo, lr=args.learning_rate, weight_decay=args.weight_decay)

    # ------------------------------------------------------------------ the step

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = ZONoOptimizer(self.args.learning_rate)
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """Keep the micro-batch; on the optimizer step's last one, one ZO step over them all.

        Transformers 5.x fetches a step's micro-batches first (``current_gradient_accumulation_steps`` of
        them, fewer in an epoch's short last step) and then calls this once per micro-batch, so keeping them
        adds no memory. They share the step's directions and their L± are token-weighted (examples, for
        classification): the g of one batch holding them all. The earlier calls return 0 and the last the
        step's loss, so the Trainer logs the step's. The learning rate is read before the scheduler steps,
        as AdamW would use it."""
        step = self.state.global_step
        if self._zo_pending_step != step:  # a step left unfinished (training stopped inside it) is dropped
            self._zo_pending, self._zo_pending_step = [], step
        self._zo_pending.append(self._zo_batch(self._prepare_inputs(inputs)))
        expected = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        if len(self._zo_pending) < expected:
            return torch.zeros((), device=self.args.device)
        micro_batches, self._zo_pending, self._zo_pending_step = self._zo_pending, [], None
        out = self.engine.step(micro_batches, lr=self._get_learning_rate())
        self._zo_outputs.append(out)
        return torch.tensor(out.loss, device=self.args.device)

    @staticmethod
    def _zo_batch(inputs) -> dict:
        batch = dict(inputs)
        if "candidate_ids" in batch and "label" not in batch and "labels" in batch:
            batch["label"] = batch.pop("labels")  # default_data_collator renames label to labels
        return batch

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns += [c for c in ZO_COLUMNS if c not in self._signature_columns]

    def train(self, *args, **kwargs):
        """The Trainer's ``train``; then the model holds the whole update (``engine.merged_model()``)."""
        try:
            return super().train(*args, **kwargs)
        finally:
            self.engine.merged_model()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Training logs: ``projected_grad`` (mean |g| over the directions and steps since the last log) and,
        for classification, ``accuracy`` (of the perturbed evaluations) in place of a ``grad_norm``."""
        if "loss" in logs and self._zo_outputs:
            outs, self._zo_outputs = self._zo_outputs, []
            logs.pop("grad_norm", None)
            grads = [abs(g) for out in outs for g in out.projected_grads]
            logs["projected_grad"] = sum(grads) / len(grads)
            accuracies = [out.accuracy for out in outs if out.accuracy is not None]
            if accuracies:
                logs["accuracy"] = sum(accuracies) / len(accuracies)
        super().log(logs, start_time)

    # ------------------------------------------------------------------ evaluation

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The batch's loss as the engine scores it (the trained weights as they stand, no perturbation)."""
        scores = self.engine.scores(self._zo_batch(self._prepare_inputs(inputs)))
        return scores.loss[0].detach(), None, None

    # ------------------------------------------------------------------ saving and resuming

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """A plain checkpoint (PEFT: the adapter) of the merged weights."""
        self.engine.merged_model()
        super()._save(output_dir, state_dict=state_dict)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            torch.save(self.engine.state_dict(), os.path.join(output_dir, ZO_STATE_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, ZO_STATE_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"resuming ZO from {checkpoint}, which holds no {ZO_STATE_FILE} (the fp32 weights, "
                             "the lowrank basis and the direction stream's position): resume from a ZOTrainer "
                             "checkpoint saved without save_only_model")
        self.engine.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
