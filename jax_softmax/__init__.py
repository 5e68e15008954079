"""jax_softmax: stable softmax, cross-entropy and fused linear cross-entropy.

Every public function is pure, jittable and vmappable, and carries a
hand-written ``jax.custom_vjp`` gradient (reverse mode only).
"""

from jax_softmax._aux import LossAux
from jax_softmax._linear import linear_softmax_loss, softmax_with_gradients
from jax_softmax._linear_ce import linear_cross_entropy
from jax_softmax._losses import (
    cross_entropy,
    softmax_cross_entropy,
    softmax_cross_entropy_with_integer_labels,
)
from jax_softmax._nll import nll_loss
from jax_softmax._objectives import (
    linear_log_prob_objective,
    log_prob_objective,
)
from jax_softmax._primitives import log_softmax, logsumexp, softmax

__version__ = "0.1.0"

__all__ = [
    "LossAux",
    "__version__",
    "cross_entropy",
    "linear_cross_entropy",
    "linear_log_prob_objective",
    "linear_softmax_loss",
    "log_prob_objective",
    "log_softmax",
    "logsumexp",
    "nll_loss",
    "softmax",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
    "softmax_with_gradients",
]
