"""Zeroth-order (ZO) fine-tuning: MeZO / LoZO reference steps (``lopt.zo.reference``), the oracles for
a batched scoring engine."""

from lopt.zo.reference import (
    CONSISTENT,
    MEZO_NO_DECAY,
    NO_DECAY,
    PUBLISHED,
    LowRank,
    ZOStepResult,
    causal_lm_loss,
    decays,
    draw_seed,
    is_refresh_step,
    lozo_perturb_,
    lozo_perturbation_directions,
    lozo_step,
    lozo_update_,
    lozo_update_directions,
    mezo_directions,
    mezo_estimate,
    mezo_perturb_,
    mezo_step,
    mezo_update_,
    projected_gradient,
    trainable_parameters,
)

__all__ = [
    "CONSISTENT", "MEZO_NO_DECAY", "NO_DECAY", "PUBLISHED", "LowRank", "ZOStepResult", "causal_lm_loss", "decays",
    "draw_seed", "is_refresh_step", "lozo_perturb_", "lozo_perturbation_directions", "lozo_step", "lozo_update_",
    "lozo_update_directions", "mezo_directions", "mezo_estimate", "mezo_perturb_", "mezo_step", "mezo_update_",
    "projected_gradient", "trainable_parameters",
]
