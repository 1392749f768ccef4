"""lkref: the readable, exact reference of the LK losses for speculative-decoding drafts.

Losses (Samarin et al. 2026, arXiv 2602.23881) with hand-derived gradients, on NumPy
or CuPy through one code path.  ``import lkref`` never imports CuPy.
"""

from .backend import backends, cupy_available, namespace
from .losses import (
    LossResult,
    kl,
    kl_backward,
    kl_forward,
    lambda_from_alpha,
    lk_alpha,
    lk_alpha_backward,
    lk_alpha_forward,
    lk_lambda,
    lk_lambda_backward,
    lk_lambda_forward,
    mean_backward,
    mean_forward,
    tv,
    tv_backward,
    tv_forward,
)
from .positions import LOSSES, MultiPositionResult, multi_position
from .validation import TARGET_SUM_ATOL, target_sum_atol
from .sampler import VerifyResult, verify, verify_greedy
from .decoding import GenerateResult, MarkovChain, generate, warp
from .multistep import AcceptLengthResult, accept_length_loss
from . import distributed, multistep, theory, testing

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "backends", "cupy_available", "namespace",
    "LossResult", "kl", "tv", "lk_alpha", "lk_lambda", "lambda_from_alpha",
    "kl_forward", "kl_backward", "tv_forward", "tv_backward",
    "lk_alpha_forward", "lk_alpha_backward", "lk_lambda_forward", "lk_lambda_backward",
    "mean_forward", "mean_backward",
    "LOSSES", "MultiPositionResult", "multi_position",
    "TARGET_SUM_ATOL", "target_sum_atol",
    "VerifyResult", "verify", "verify_greedy",
    "GenerateResult", "MarkovChain", "generate", "warp",
    "AcceptLengthResult", "accept_length_loss",
    "distributed", "multistep", "theory", "testing",
]
