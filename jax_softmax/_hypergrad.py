"""Gradients of the loss with respect to its hyperparameters.

Given the row stats and per-row cotangents of :mod:`jax_softmax._kernel`:
label smoothing, z-loss, soft cap, class weights and temperature. Under
``jit`` XLA drops the ones that are not used.
"""

from __future__ import annotations

import jax.numpy as jnp

from jax_softmax._aux import LossAux, aux_grad_capped
from jax_softmax._kernel import (
  Classes,
  Hyper,
  RowCotangents,
  RowStats,
  class_sum,
  grad_capped,
  label_weights,
  probs,
  scaled_logits,
  smoothed_target,
  weighted,
  z_loss_coef,
  z_loss_grad,
)
from jax_softmax._numerics import NEG_INF, div_scalar, mul0, sharded_like


def grad_hyper(z, target, class_mask, hp: Hyper, st: RowStats,
               cot: RowCotangents, *, int_labels: bool, classes: Classes,
               dz, aux: LossAux | None = None, aux_cot=(None, None)
               ) -> Hyper:
  """Gradients of the loss with respect to the hyperparameters.

  ``dz`` is the whole gradient with respect to the raw logits ``z`` (the
  temperature's comes from it); ``aux`` with its cotangents ``aux_cot =
  (g_lse, g_ent)`` (None: zero) adds the aux outputs' share of the soft
  cap's (``lse`` and ``entropy`` are those of the capped logits; the
  other hyperparameters leave them unchanged). Under ``jit`` XLA drops
  the ones that are not used. With a sharded ``classes`` they are those
  of the whole vocabulary (summed over shards).
  """
  zc, p, nll = probs(z, class_mask, hp, st, target if int_labels else None,
                    classes=classes)
  valid = zc != NEG_INF
  nll = jnp.where(valid, nll, 0.0)
  rows = jnp.where(st.counted, cot.xent, 0.0)
  nll_y = None
  if int_labels:
    nll_y = jnp.where(st.nan_row, jnp.nan, classes.take(nll, target))
  d_eps = d_z = d_cap = d_w = None
  if hp.label_smoothing is not None:
    d_eps = jnp.sum(rows * _smoothing_slope(nll, nll_y, target, valid, hp,
                                            st, classes))
  if hp.z_loss is not None:
    d_z = jnp.sum(jnp.where(st.counted, (cot.z_loss * st.lse) * st.lse, 0.0))
  if hp.soft_cap is not None:
    g = grad_capped(zc, p, target, hp, int_labels, st, cot, classes)
    if hp.z_loss is not None:
      g = g + z_loss_grad(p, hp, st, cot)
    d_cap = _cap_grad(g, z, valid & st.counted[:, None], hp, classes)
    if aux is not None and aux_cot != (None, None):
      _, aux_valid, g_aux = aux_grad_capped(z, class_mask, hp, aux,
                                            *aux_cot, classes=classes)
      d_cap = d_cap + _cap_grad(g_aux, z, aux_valid, hp, classes)
  if hp.class_weights is not None:
    d_w = _class_weight_grad(nll, nll_y, target, valid, rows, hp, st, cot,
                             classes).astype(hp.class_weights.dtype)
  # The rows' d loss / d lse: the z-loss's and the aux lse's (the
  # cross-entropy, log p and the entropy are shift invariant).
  lse_cot = jnp.zeros(st.lse.shape, dz.dtype)
  if hp.z_loss is not None:
    lse_cot = jnp.where(st.counted, z_loss_coef(hp, cot) * st.lse, 0.0)
  if aux_cot[0] is not None:
    lse_cot = lse_cot + aux_cot[0]
  return Hyper(d_eps, d_z, d_cap, d_w,
               _temperature_grad(dz, z, hp, classes, lse_cot))


def _cap_grad(g, z, keep, hp: Hyper, classes: Classes):
  """``sum g * d zc / d cap`` over ``keep``, for a gradient ``g`` with
  respect to ``zc = cap * tanh(zt / cap)``, ``zt = z / temperature``."""
  u = div_scalar(jnp.where(keep, scaled_logits(z, hp), 0.0), hp.soft_cap)
  return classes.total(jnp.sum(jnp.where(keep, g * _cap_slope(u), 0.0)))


def _cap_slope(u):
  """``d (cap tanh(zt / cap)) / d cap = tanh u - u (1 - tanh^2 u)`` at
  ``u = zt / cap``: ``+-1`` at ``u = +-inf`` (``mul0``: not ``inf * 0``).
  Below ``|u| = 1`` the difference cancels (it is ``2 u^3 / 3 + ...``:
  17% off at ``u = 1e-3``); there it is ``(1 - tanh^2 u) (sinh v - v) / 2``
  with ``v = 2 u`` and ``sinh v - v`` from its series, all of whose terms
  have one sign (six terms: ``2e-8`` relative at ``|v| = 2``)."""
  th = jnp.tanh(u)
  sech2 = 1 - jnp.square(th)
  v = 2 * jnp.clip(u, -1.0, 1.0)
  v2 = jnp.square(v)
  series = v * v2 / 6
  poly = jnp.ones_like(v2)
  for k in (156, 110, 72, 42, 20):   # (2n+2)(2n+3) for n = 5, ..., 1
    poly = 1 + v2 / k * poly
  small = sech2 * (series * poly) / 2
  return jnp.where(jnp.abs(u) < 1, small, th - mul0(sech2, u))


def _temperature_grad(dz, z, hp: Hyper, classes: Classes, lse_cot):
  """``d loss / d temperature`` from the loss's whole gradient ``dz`` with
  respect to the raw logits ``z``: the logits enter only as ``z / T``, so
  it is ``-sum dz * z / T`` (0 where ``dz`` is: masked ``-inf`` logits).
  None without a temperature.

  Summed per row about the row's largest logit ``m`` (of those ``dz``
  reaches): ``sum_c dz_c (z_c - m) + m sum_c dz_c``, with ``sum_c dz_c``
  the analytic ``lse_cot / T`` (``lse_cot``: the rows' ``d loss / d lse``;
  the cross-entropy's terms sum to 0 exactly, their rounded values do
  not): a large common logit (``z = [1e6, 1e6 + 1]``) would otherwise
  multiply that rounding (6% off). With a soft cap the row sum is not
  analytic and is summed.
  """
  if hp.temperature is None:
    return None
  zf = z.astype(dz.dtype)
  used = dz != 0
  m = classes.max(jnp.where(used, zf, NEG_INF))
  m = jnp.where(jnp.isfinite(m), m, 0.0)   # no entry used: any shift
  centered = jnp.where(used, dz * (zf - m[:, None]), 0.0)
  if hp.soft_cap is None:
    row_sum = div_scalar(lse_cot, hp.temperature)
  else:
    row_sum = classes.sum(jnp.where(used, dz, 0.0))
  return -(classes.total(jnp.sum(centered)) + jnp.sum(m * row_sum)) / (
      hp.temperature)


def _smoothing_slope(nll, nll_y, target, valid, hp, st, classes):
  """``d xent / d eps`` per row (0 on uncounted rows)."""
  k = st.support_size
  if nll_y is not None:
    w_y = label_weights(target, hp, classes.num_classes, nll.dtype)
    smooth = classes.sum(weighted(nll, classes.weights(hp))) / k
    return jnp.where(st.counted, smooth - w_y * nll_y, 0.0)
  dq = valid / k[:, None] - target
  return jnp.where(st.counted, jnp.sum(weighted(dq * nll, hp), axis=-1), 0.0)


def _class_weight_grad(nll, nll_y, target, valid, rows, hp, st,
                       cot: RowCotangents, classes: Classes):
  """``d loss / d class_weights``, ``(num_classes,)``."""
  eps = hp.label_smoothing
  k = st.support_size
  if nll_y is None:
    q = smoothed_target(target, valid, k, eps)
    return sharded_like(jnp.sum(rows[:, None] * mul0(q, nll), 0),
                        hp.class_weights)
  keep = 1.0 if eps is None else 1 - eps
  per_y = rows * keep * nll_y - jnp.where(st.counted, cot.scale, 0.0) * (
      cot.mean_xent)
  n = classes.num_classes
  d_w = class_sum(per_y, jnp.clip(target, 0, n - 1), hp.class_weights)
  if eps is not None:
    d_w = d_w + sharded_like(classes.scatter(jnp.sum(
        rows[:, None] * eps * nll / k[:, None], 0)), hp.class_weights)
  return d_w
