"""Per-row by-products of a loss (:class:`LossAux`) and their gradients."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_softmax._kernel import (
  Classes,
  Hyper,
  RowStats,
  probs,
  stats_exp,
  support_logits,
  to_logits,
)
from jax_softmax._numerics import NEG_INF, mul0, shift_exp


class LossAux(NamedTuple):
  """Per-row by-products of a loss, all of the batch shape.

  Filled for every row, uncounted ones included (``correct`` is False
  there). ``lse`` and ``entropy`` are differentiable; ``argmax`` and
  ``correct`` are not. A row whose ``lse`` and ``entropy`` cotangents are
  both 0 (left out of a metric) gets exactly 0 gradient from them, even
  if it holds NaN or ``inf``.

  Attributes:
    lse: log-sum-exp of the (capped, masked) logits; ``-inf`` for a row
      with an empty support.
    entropy: entropy ``-sum_c p_c log p_c`` of the softmax distribution.
    argmax: first index of the maximum of the raw (masked) logits.
    correct: ``argmax == label`` (the target's argmax for probability
      targets) on counted rows, False elsewhere.
  """

  lse: jax.Array
  entropy: jax.Array
  argmax: jax.Array
  correct: jax.Array


def _log_probs(z, class_mask, hp: Hyper, classes: Classes):
  """Capped logits, support, ``log p`` (0 off the support) and ``lse`` of
  every row, counted or not; an empty row has ``lse = -inf`` and no
  support. No NaN or ``0 * inf`` is formed on the way."""
  zc = support_logits(z, class_mask, hp)
  valid = zc != NEG_INF
  m, shifted, e = shift_exp(zc, classes.max(zc)[:, None])
  log_s = classes.log_sum(shifted, e)
  safe = jnp.where(log_s == NEG_INF, 0.0, log_s)[:, None]
  log_p = jnp.where(valid, shifted - safe, 0.0)
  return zc, valid, log_p, m[:, 0] + log_s


def row_aux(z, target, counted, class_mask, hp: Hyper, *, int_labels: bool,
            classes: Classes) -> LossAux:
  """:class:`LossAux` of a ``(rows, C)`` block (one more pass over it).

  A row with an empty support has ``lse = -inf`` and entropy 0 (the
  entropy of no outcome; its gradient is 0 too)."""
  _, valid, log_p, lse = _log_probs(z, class_mask, hp, classes)
  p = jnp.where(valid, jnp.exp(log_p), 0.0)
  entropy = classes.sum(mul0(p, -log_p))   # p = 0 at log p = -inf: 0
  raw = z if class_mask is None else jnp.where(class_mask, z, NEG_INF)
  top = classes.argmax(raw)
  want = target if int_labels else classes.argmax(target)
  return LossAux(lse, entropy, top, counted & (top == want))


def grad_aux(z, class_mask, hp: Hyper, aux: LossAux, g_lse, g_ent, *,
             classes: Classes):
  """``d (sum g_lse * lse + sum g_ent * entropy) / d z`` for a block.

  ``d lse / d z = p`` and ``d H / d z = -p (log p + H)``, on the support.
  ``g_lse`` / ``g_ent`` are ``(rows,)`` cotangents or None (zero).
  """
  zc, valid, g = aux_grad_capped(z, class_mask, hp, aux, g_lse, g_ent,
                                 classes=classes)
  return jnp.where(valid, to_logits(g, zc, hp), 0.0)


def aux_grad_capped(z, class_mask, hp: Hyper, aux: LossAux, g_lse, g_ent, *,
                    classes: Classes):
  """``(zc, support, g)``: :func:`grad_aux`'s gradient with respect to the
  capped logits ``zc`` (before the cap's and temperature's factors).
  A row whose cotangents are both 0 (an uncounted row of an objective, a
  row the caller's metric leaves out) gets exactly 0, whatever it holds:
  its NaN reaches neither ``dz`` nor the hyperparameters' sums."""
  zc, valid, log_p, _ = _log_probs(z, class_mask, hp, classes)
  p = jnp.where(valid, jnp.exp(log_p), 0.0)
  g = jnp.zeros_like(p)
  if g_lse is not None:
    g = g + g_lse[:, None] * p
  if g_ent is not None:
    g = g + _entropy_grad(p, -log_p, aux.entropy, g_ent)
  valid = valid & used_rows(g_lse, g_ent, p.shape[0])[:, None]
  return zc, valid, jnp.where(valid, g, 0.0)


def used_rows(g_lse, g_ent, rows: int):
  """The ``(rows,)`` mask of rows with a nonzero aux cotangent (``g_lse``
  or ``g_ent``; None is zero): the only rows the aux gradient reaches."""
  used = jnp.zeros((rows,), bool)
  for g_a in (g_lse, g_ent):
    used = used if g_a is None else used | (g_a != 0)
  return used


def _entropy_grad(p, nll, entropy, g_ent):
  """``g_ent * d H / d zc = g_ent p (nll - H)`` with ``nll = -log p``
  (``(rows,)`` vectors broadcast over the classes); 0 where ``p = 0`` at
  ``nll = inf`` (a row spread beyond the float range)."""
  return g_ent[:, None] * mul0(p, nll - entropy[:, None])


def stats_entropy(z, st: RowStats, hp: Hyper, classes: Classes):
  """The softmax entropy of each row of a block from its row stats,
  ``H = log s - sum_c e_c (zc_c - m) / s`` with ``e = exp(zc - m)`` and
  ``s = sum_c e_c``: both terms non-negative (no cancellation), and the
  sum needs no ``log s``, so XLA can fuse it with the one of ``s``. 0 on
  uncounted rows; NaN rows NaN."""
  _, shifted, e = stats_exp(z, None, hp, st)
  # (This form, not e * where(...): XLA then holds one block less.) e = 0
  # where shifted = -inf, off the support or below the float range: 0.
  mean_shift = classes.sum(jnp.where(e == 0, 0.0, e * shifted))
  h = st.log_sum - mean_shift * jnp.exp(-st.log_sum)
  return jnp.where(st.counted, h, 0.0)


def grad_stats_entropy(z, st: RowStats, entropy, g_ent, hp: Hyper):
  """``d sum(g_ent * H) / d z`` for :func:`stats_entropy`'s ``H``: 0 on
  uncounted rows and off the support."""
  zc, p, nll = probs(z, None, hp, st)
  valid = zc != NEG_INF
  g = to_logits(_entropy_grad(p, nll, entropy, g_ent), zc, hp)
  return jnp.where(valid & st.counted[:, None], g, 0.0)
