"""lopt_kernels: fused Triton kernels for LoPT post-training.

Every op has a pure-PyTorch reference beside it (``*_reference``): the CPU path and the test oracle.
``current_backend(device)`` says which one runs. The compiled ``_C`` extension (csrc/) is optional:
``has_extension()`` tells whether it is loaded, ``build_extension()`` builds it on the spot.
"""

from .adamw import adamw_step, adamw_step_reference
from .backend import current_backend
from .boundary import BoundaryMemory
from .extension import build_extension, has_extension
from .linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference, lm_head_weight
from .patch import fused_ops, patch, unpatch
from .philox import philox_rand, philox_randint4x, philox_randn
from .recon_loss import recon_loss, recon_loss_reference
from .rms_norm import rms_norm, rms_norm_reference
from .rope import apply_rope, apply_rope_reference
from .swiglu import swiglu, swiglu_reference

__all__ = [
    "BoundaryMemory",
    "adamw_step",
    "adamw_step_reference",
    "apply_rope",
    "apply_rope_reference",
    "build_extension",
    "current_backend",
    "fused_ops",
    "has_extension",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "lm_head_weight",
    "patch",
    "philox_rand",
    "philox_randint4x",
    "philox_randn",
    "recon_loss",
    "recon_loss_reference",
    "rms_norm",
    "rms_norm_reference",
    "swiglu",
    "swiglu_reference",
    "unpatch",
]
