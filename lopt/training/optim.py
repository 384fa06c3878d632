"""Optimizers for ``--optimizer``: AdamW with its state in a chosen precision, or bitsandbytes' 8-bit AdamW.

On the GPU the parameters are bf16. ``torch.optim.AdamW`` would keep its moments in bf16 too and add
each update to a bf16 weight, where a step of lr = 1e-5 on a weight of 0.03 is below half a unit in
the last place and is lost. So:

- ``adamw``: fp32 moments, and an fp32 master copy of every non-fp32 parameter; the update is made
  on the master and rounded into the parameter. State: 8 bytes per fp32 parameter, 12 per bf16 one.
  On fp32 parameters it is ``torch.optim.AdamW``: bit for bit on the PyTorch path, to fp32 roundoff
  in the kernel (which fuses multiply-adds).
- ``adamw-bf16``: moments in bf16 and no master copy; a bf16 parameter takes its fp32 update with
  stochastic rounding, so small updates survive in expectation. State: 4 bytes per parameter.
- ``adamw-8bit``: ``bitsandbytes.optim.AdamW8bit`` (block-wise 8-bit moments, about 2 bytes per parameter).

``adamw`` and ``adamw-bf16`` update each parameter with ``lopt_kernels.adamw_step``: one Triton kernel
(one pass over the parameter, gradient and state) where ``lopt_kernels.current_backend`` picks Triton,
else the same arithmetic as PyTorch ops.
"""

from __future__ import annotations

import torch

import lopt_kernels

from lopt.config import OPTIMIZERS
from lopt.errors import UsageError
from lopt.parallel.sharding import local


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
