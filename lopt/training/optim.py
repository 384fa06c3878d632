"""Optimizers for ``--optimizer``, and the run's set of them: one over every parameter, or one per block.

On the GPU the parameters are bf16, and ``torch.optim.AdamW`` would keep bf16 moments and add each update
to a bf16 weight, where a step of lr = 1e-5 on a weight of 0.03 is lost to rounding. So ``adamw`` keeps
fp32 moments and an fp32 master copy of every non-fp32 parameter (8 bytes of state per fp32 parameter,
12 per bf16 one; on fp32 parameters it is ``torch.optim.AdamW``: bit for bit on the PyTorch path, to
fp32 roundoff in the kernel, which fuses multiply-adds);
``adamw-bf16`` keeps bf16 moments and no master, rounding each bf16 update stochastically (4 bytes);
``adamw-8bit`` is ``bitsandbytes.optim.AdamW8bit`` (about 2 bytes). ``adamw`` and ``adamw-bf16`` update
each parameter with ``lopt_kernels.adamw_step`` (one Triton kernel, or the same arithmetic in PyTorch ops).

``build_optimizers`` picks, once, ``OneOptimizer`` or (per-block steps: ``--early-lower-step``, ``--boundary
fresh``, ``--schedule sequential``, ``--pipeline``) ``BlockOptimizers``; the step kinds, the placements and
the checkpoints use either through the same methods.
"""

from __future__ import annotations

import torch

import lopt_kernels

from lopt.config import OPTIMIZERS, TrainConfig
from lopt.errors import UsageError
from lopt.parallel.sharding import local
from lopt.training.checkpoint import load_optimizer_state


class AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected) with moments stored in ``state_dtype``.

    ``state_dtype=torch.float32`` keeps an fp32 master copy of lower-precision parameters;
    ``torch.bfloat16`` keeps none and rounds bf16 parameters stochastically.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 state_dtype: torch.dtype = torch.float32):
        if state_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"state_dtype must be float32 or bfloat16, got {state_dtype}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.state_dtype = state_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                # A sharded parameter (--shard) is updated through its shard; its state is the shard's.
                param, grad = local(p), local(p.grad)
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param, dtype=self.state_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(param, dtype=self.state_dtype)
                    if self.state_dtype == torch.float32 and param.dtype != torch.float32:
                        state["master"] = param.float()
                state["step"] += 1
                beta1, beta2 = group["betas"]
                lopt_kernels.adamw_step(param, grad, state["exp_avg"], state["exp_avg_sq"], state.get("master"),
                                        lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                                        weight_decay=group["weight_decay"], step=state["step"])
        return loss


def build_optimizer(name: str, param_groups: list[dict]) -> torch.optim.Optimizer:
    if name == "adamw":
        return AdamW(param_groups, state_dtype=torch.float32)
    if name == "adamw-bf16":
        return AdamW(param_groups, state_dtype=torch.bfloat16)
    if name == "adamw-8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise UsageError("--optimizer adamw-8bit needs bitsandbytes: pip install bitsandbytes") from None
        return bitsandbytes.optim.AdamW8bit(param_groups)
    raise UsageError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


class Optimizers:
    """The run's optimizers (``all``) over the model's parameter groups, each group's peak rate kept as
    ``initial_lr`` for the schedule. ``rebuild`` builds them again over the model as it is now (``--shard``:
    over this rank's shards)."""

    per_block = False

    def __init__(self, cfg: TrainConfig, model):
        self.cfg = cfg
        self.all: list[torch.optim.Optimizer] = []
        self.rebuild(model)

    def _groups(self, model) -> list[list[dict]]:
        raise NotImplementedError

    def rebuild(self, model):
        per_optimizer = self._groups(model)
        for group in (g for groups in per_optimizer for g in groups):
            group["initial_lr"] = group["lr"]
        self.all = [build_optimizer(self.cfg.optimizer, groups) for groups in per_optimizer]

    def __len__(self) -> int:
        return len(self.all)

    def block_params(self, b: int) -> list[torch.nn.Parameter]:
        """The parameters optimizer ``b`` steps, in its order."""
        return [p for group in self.all[b].param_groups for p in group["params"]]

    def set_lr(self, factor: float):
        """Every group at ``factor`` times its peak rate."""
        for optimizer in self.all:
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor

    @property
    def lr(self) -> float:
        """The rate logged: the only optimizer's, or (per block) the upper block's."""
        return self.all[-1].param_groups[0]["lr"]

    def state_dicts(self) -> list[dict]:
        return [optimizer.state_dict() for optimizer in self.all]

    def load(self, states: list[dict]):
        """Each optimizer's state from ``states`` (laid out for these optimizers), in the dtypes it was saved in."""
        for optimizer, saved in zip(self.all, states):
            load_optimizer_state(optimizer, saved)


class OneOptimizer(Optimizers):
    """One optimizer over every group (``LoPTModel.param_groups``): the step clips and steps all at once."""

    def _groups(self, model) -> list[list[dict]]:
        return [model.param_groups(self.cfg.lr, self.cfg.lr_lower, self.cfg.weight_decay)]

    def last_params(self, model) -> list[torch.nn.Parameter]:
        """What the step's one clip and step cover: every trainable parameter, in the model's order."""
        return [p for p in model.parameters() if p.requires_grad]


class BlockOptimizers(Optimizers):
    """One optimizer per block (``LoPTModel.block_param_groups``): lower block b's steps at its boundary, or
    when the block is done; the upper block's at the end of the step."""

    per_block = True

    def _groups(self, model) -> list[list[dict]]:
        return model.block_param_groups(self.cfg.lr, self.cfg.lr_lower, self.cfg.weight_decay)

    def last_params(self, model) -> list[torch.nn.Parameter]:
        """What the step's last clip and step cover: the upper block's parameters."""
        return self.block_params(len(self.all) - 1)


def build_optimizers(cfg: TrainConfig, model) -> Optimizers:
    """One optimizer, or one per block where blocks step on their own (and there is more than one block)."""
    per_block_steps = (cfg.early_lower_step or cfg.boundary == "fresh" or cfg.schedule == "sequential"
                       or cfg.pipeline)
    return BlockOptimizers(cfg, model) if per_block_steps and model.num_blocks > 1 else OneOptimizer(cfg, model)


class ZOUpdate:
    """``--method zo``'s optimizer: the engine (``lopt.zo.ZOEngine``) updates the weights itself from the step's
    scores, so there is no optimizer state; this holds the rate the schedule sets and the engine's state
    (fp32 update, low-rank basis, seed position) for checkpoints. It poses as the run's one optimizer."""

    per_block = False

    def __init__(self, cfg: TrainConfig, engine):
        self.engine = engine
        self.param_groups = [{"lr": cfg.lr, "initial_lr": cfg.lr, "params": []}]
        self.state: dict = {}  # no optimizer state: the finite check reads the weights
        self.all = [self]

    def __len__(self) -> int:
        return 1

    def set_lr(self, factor: float):
        group = self.param_groups[0]
        group["lr"] = group["initial_lr"] * factor

    @property
    def lr(self) -> float:
        return self.param_groups[0]["lr"]

    def state_dicts(self) -> list[dict]:
        return [self.engine.state_dict()]

    def load(self, states: list[dict]):
        try:
            self.engine.load_state_dict(states[0])
        except (ValueError, KeyError) as error:
            raise UsageError(f"the checkpoint's ZO state does not fit this run: {error}") from None
