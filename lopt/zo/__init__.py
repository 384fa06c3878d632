"""Zeroth-order (ZO) fine-tuning: the inference-shaped engine (``ZOEngine``: a step's 2P perturbed
evaluations scored in one forward over frozen weights; ``lopt.zo.engine``) and the MeZO / LoZO reference
steps it is checked against (``lopt.zo.reference``)."""

from lopt.zo.directions import (
    KINDS,
    LowRankDraws,
    Perturbation,
    SeededLowRank,
    basis_seed,
    direction_seeds,
    step_seed,
)
from lopt.zo.engine import ZOEngine, ZOSettings, ZOStepOutput
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
from lopt.zo.scoring import Scores, candidate_log_probs

__all__ = [
    "KINDS", "LowRankDraws", "Perturbation", "Scores", "SeededLowRank", "ZOEngine", "ZOSettings", "ZOStepOutput",
    "basis_seed", "candidate_log_probs", "direction_seeds", "step_seed",
    "CONSISTENT", "MEZO_NO_DECAY", "NO_DECAY", "PUBLISHED", "LowRank", "ZOStepResult", "causal_lm_loss", "decays",
    "draw_seed", "is_refresh_step", "lozo_perturb_", "lozo_perturbation_directions", "lozo_step", "lozo_update_",
    "lozo_update_directions", "mezo_directions", "mezo_estimate", "mezo_perturb_", "mezo_step", "mezo_update_",
    "projected_gradient", "trainable_parameters",
]
