"""The retention study's methods: what each trains, and the learning rates its sweep tries.

Every method sees the same data (the embedded record task), steps, batch and sequence length. The LoPT
methods and end-to-end fine-tuning run through ``lopt.train`` (the trainer under study); LoRA and BAdam
run through ``benchmarks.retention.peers``, a plain loop with the trainer's schedule (linear warm-up
over 5% of the steps, cosine to 0.1 of the peak), clipping (1.0) and AdamW.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FULL_LRS = (2e-5, 5e-5, 1e-4)  # the default run uses 5e-5; the pick is the least KL at full exact match
LORA_LRS = (2e-4, 5e-4, 1e-3)  # LoRA's adapters start at zero and want a larger step
BADAM_SWITCH_EVERY = 5  # steps per active layer: a few dozen steps visit a handful of the 30 layers


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    lrs: tuple[float, ...] = FULL_LRS
    lopt: dict | None = None  # TrainConfig overrides (``lr_lower``: a multiple of ``lr``); None: a peer loop
    peer: str | None = None  # "lora" | "badam"
    notes: dict = field(default_factory=dict)


METHODS = {m.name: m for m in (
    Method("e2e", "end-to-end full fine-tuning (k=1)", lopt=dict(num_blocks=1)),
    Method("lopt-k2", "LoPT k=2, the paper's defaults (lambda 10, lr_lower = lr)",
           lopt=dict(num_blocks=2, lambda_aux=10.0, lr_lower=1.0)),
    Method("lopt-k2-lower-lr/10", "LoPT k=2, lr_lower = lr/10", lopt=dict(num_blocks=2, lambda_aux=10.0, lr_lower=0.1)),
    Method("lopt-k2-fresh", "LoPT k=2, --boundary fresh (the paper's described step)",
           lopt=dict(num_blocks=2, lambda_aux=10.0, lr_lower=1.0, boundary="fresh")),
    Method("lopt-k4", "LoPT k=4 (paper defaults)", lopt=dict(num_blocks=4, lambda_aux=10.0, lr_lower=1.0)),
    Method("upper-only", "the upper half only (k=2, lower half frozen: --lr-lower 0)",
           lopt=dict(num_blocks=2, lambda_aux=10.0, lr_lower=0.0)),
    Method("lora", "LoRA through peft, rank 16 (alpha 32) on all linear layers", lrs=LORA_LRS, peer="lora",
           notes=dict(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)),
    Method("badam", "BAdam (badam.BlockOptimizer over AdamW, as its README shows), one layer at a time",
           peer="badam", notes=dict(switch_block_every=BADAM_SWITCH_EVERY, switch_mode="random")),
)}
