"""``nll_loss``: the negative log-likelihood of given log-probabilities."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_softmax import _checks
from jax_softmax._kernel import (
  Hyper,
  class_sum,
  label_weights,
  make_hyper,
  take_rows,
)
from jax_softmax._numerics import (
  NEG_INF,
  compute_dtype,
  mul0,
  sharded_like,
  unflatten_rows,
)
from jax_softmax._reduce import (
  reduce_rows,
  row_cotangents,
  stats_of,
  weight_grad,
)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _nll(reduction, lp, y, row, class_mask, hp, weights):
  return _nll_fwd(reduction, lp, y, row, class_mask, hp, weights)[0]


def _nll_fwd(reduction, lp, y, row, class_mask, hp, weights):
  n = lp.shape[-1]
  yc = jnp.clip(y, 0, n - 1)
  counted = row if class_mask is None else row & jnp.any(class_mask, -1)
  bad = counted & ((y < 0) | (y >= n))
  lp_y = take_rows(lp, yc).astype(compute_dtype(lp.dtype))
  if class_mask is not None:
    lp_y = jnp.where(take_rows(class_mask, yc), lp_y, NEG_INF)
  # Uncounted rows may hold anything: their lp_y reaches no gradient.
  lp_y = jnp.where(counted, lp_y, 0.0)
  w_y = label_weights(y, hp, n, lp_y.dtype)
  nll = jnp.where(counted, jnp.where(bad, jnp.nan, mul0(w_y, -lp_y)), 0.0)
  st = stats_of(nll, counted, jnp.where(counted, w_y, 0.0), nan_row=bad)
  return (reduce_rows(st, hp, reduction, weights=weights),
          (lp, y, class_mask, hp, st, lp_y, weights))


def _nll_bwd(reduction, res, g):
  lp, y, class_mask, hp, st, lp_y, weights = res
  cot = row_cotangents(st, reduction, g, int_labels=True, weights=weights)
  n = lp.shape[-1]
  w_y = label_weights(y, hp, n, cot.xent.dtype)
  onehot = jnp.arange(n)[None, :] == y[:, None]
  d = jnp.where(onehot, -(cot.xent * w_y)[:, None], 0.0)
  if class_mask is not None:
    d = jnp.where(class_mask, d, 0.0)
  nan_row = st.counted & jnp.isnan(st.xent)
  d = jnp.where(nan_row[:, None], jnp.nan, d)
  d_w = None
  if hp.class_weights is not None:
    d_w = class_sum(mul0(cot.xent, -lp_y) - cot.scale * cot.mean_xent,
                    jnp.clip(y, 0, n - 1), hp.class_weights)
  return (sharded_like(d.astype(lp.dtype), lp), None, None, None,
          Hyper(class_weights=d_w),
          weight_grad(st, cot, weights))


_nll.defvjp(_nll_fwd, _nll_bwd)
_nll_jit = jax.jit(_nll, static_argnums=0)


def nll_loss(
    log_probs: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    axis: int | tuple[int, ...] = -1,
    where: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = -100,
    class_weights: jax.typing.ArrayLike | None = None,
    reduction: str = "mean",
    check_labels: bool = False,
    weights: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  r"""Negative log-likelihood of integer labels under given log-probabilities.

  .. math::
    \ell = -w_y \log p_y

  ``"mean"`` divides the sum over counted rows by ``sum w_y`` over counted
  rows (PyTorch's ``F.nll_loss``); an all-ignored batch gives 0. The
  gradient is ``-w_y`` at the label (times the cotangent), 0 elsewhere.

  Args:
    log_probs: ``(..., classes)`` log-probabilities (e.g. from
      :func:`log_softmax`).
    labels: integer labels of the batch shape.
    axis, where, ignore_index, class_weights, reduction: as in
      :func:`cross_entropy` (a masked target class gives ``+inf``).
    check_labels, weights: as in :func:`cross_entropy`.

  Returns:
    Scalar or per-row loss of dtype ``result_type(log_probs, float32)``. A
    ``-inf`` target log-probability gives ``+inf``; NaN at the target or a
    bad label gives NaN loss and gradient for that row; uncounted rows give
    0 and gradient 0.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jax_softmax import log_softmax, nll_loss
    >>> nll_loss(log_softmax(jnp.array([[0.0, 0.0]])), jnp.array([0]))
    Array(0.6931472, dtype=float32)
  """
  _checks.check_reduction(reduction)
  r = _checks.logit_rows(log_probs, labels, axis, where, ignore_index,
                         check_labels, name="log_probs")
  if not r.int_labels:
    raise TypeError("nll_loss takes integer labels; got dtype "
                    f"{jnp.asarray(labels).dtype}.")
  hp = make_hyper(0.0, 0.0, None, class_weights, r.logits.shape[-1],
                  compute_dtype(r.logits.dtype))
  out = _nll_jit(reduction, r.logits, r.target, r.row_mask, r.class_mask, hp,
                 _checks.row_weights(weights, r.batch_shape,
                                     compute_dtype(r.logits.dtype),
                                     batch_spec=r.batch_spec))
  return (unflatten_rows(out, r.batch_shape, r.batch_spec)
          if reduction == "none" else out)
