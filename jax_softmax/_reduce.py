"""Reductions of per-row terms and the per-row cotangents they give back.

Shared by every loss: :func:`reduce_rows` turns :class:`RowStats` into the
loss, :func:`row_cotangents` turns the loss's cotangent into per-row ones
(:class:`RowCotangents`) for the kernel's gradient functions. With
``batch_axes`` the rows are this device's share of a batch split over those
mesh axes (the sums are global).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

from jax_softmax._kernel import Hyper, RowCotangents, RowStats
from jax_softmax._numerics import clean_rows, mul0, sharded_like, unflatten_rows
from jax_softmax._sharded import BatchAxes, batch_sum


def weighted_xent(st: RowStats, weights):
  """``weights * xent`` per row (``0 * inf = 0``; uncounted rows 0)."""
  if weights is None:
    return st.xent
  return mul0(jnp.where(st.counted, weights, 0.0).astype(st.xent.dtype),
              st.xent)


def reduce_rows(st: RowStats, hp: Hyper, reduction: str,
                batch_axes: BatchAxes = None, weights=None) -> jax.Array:
  """Applies ``reduction`` to the per-row terms of ``st``, the
  cross-entropy terms times the per-row ``weights`` if given (the
  denominators of ``"mean"`` do not change).

  The z-loss term is formed per row as ``(z_loss * lse) * lse``, which
  stays finite wherever the result does (``lse**2`` alone overflows
  float32 beyond ``|lse| = 1.8e19``).
  """
  xent = weighted_xent(st, weights)
  xent = xent if reduction == "none" else batch_sum(xent, batch_axes)
  d_xent, d_z = denominators(st, reduction, batch_axes)
  xent = xent / d_xent
  if hp.z_loss is None:
    return xent
  z_rows = jnp.where(st.counted, (hp.z_loss * st.lse) * st.lse, 0.0)
  if reduction == "none":
    return xent + z_rows
  return xent + batch_sum(z_rows, batch_axes) / d_z


def denominators(st: RowStats, reduction: str, batch_axes: BatchAxes):
  """Divisors of the summed cross-entropy and z-loss terms: for
  ``"mean"``, ``sum mean_weight`` and the count over counted rows, else 1.

  A batch with no counted row has a zero numerator too: its mean is 0, not
  NaN. Only that case is guarded: class weights that sum to 0 over counted
  rows divide by 0 (NaN or inf, as PyTorch).
  """
  one = jnp.ones((), st.xent.dtype)
  if reduction != "mean":
    return one, one
  n = batch_sum(st.counted.astype(st.xent.dtype), batch_axes)
  none = n == 0
  return (jnp.where(none, one, batch_sum(st.mean_weight, batch_axes)),
          jnp.where(none, one, n))


def row_cotangents(st: RowStats, reduction: str, g, *, int_labels: bool,
                   batch_axes: BatchAxes = None, weights=None
                   ) -> RowCotangents:
  """Per-row cotangents of the loss ``reduce_rows(st, ..., weights)`` for
  its cotangent ``g``. Only ``counted``, ``mean_weight`` (and, for
  ``mean_xent``, ``xent``) of ``st`` are read."""
  g = jnp.asarray(g, st.xent.dtype)
  d_xent, d_z = denominators(st, reduction, batch_axes)
  mean_xent = jnp.zeros((), st.xent.dtype)
  if reduction == "mean" and int_labels:
    mean_xent = batch_sum(weighted_xent(st, weights), batch_axes) / d_xent

  def per_row(c):
    return jnp.where(st.counted, jnp.broadcast_to(c, st.xent.shape), 0.0)

  scale = per_row(g / d_xent)
  xent = scale if weights is None else per_row(scale * weights)
  return RowCotangents(xent, per_row(g / d_z), mean_xent, scale)


def weight_grad(st: RowStats, cot: RowCotangents, weights):
  """``d loss / d weights``: each counted row's cross-entropy term times
  the reduction's scale (None without weights)."""
  if weights is None:
    return None
  return sharded_like(jnp.where(st.counted, cot.scale * st.xent, 0.0),
                      weights).astype(weights.dtype)


class PerRow(NamedTuple):
  """Per-row inputs of a loss beside its labels (or their gradients)."""

  weights: jax.Array | None     # cross-entropy weights, ``(rows,)``
  fn_args: tuple                # an objective's arguments, ``(rows, ...)``


def _objective_inputs(st: RowStats, entropy, fn_args):
  """``(log p_y, entropy, *fn_args)`` with uncounted rows' set to 0, so
  that ``fn`` and its derivative see no NaN they could turn into a
  ``0 * inf`` there."""
  return (jnp.where(st.counted, -st.xent, 0.0),
          jnp.where(st.counted, entropy, 0.0),
          *(clean_rows(a, st.counted) for a in fn_args))


def stats_of(xent, counted, mean_weight, nan_row=None) -> RowStats:
  """Row stats with only what the reductions read: the per-row ``xent``
  (0 where not ``counted``), ``counted``, ``mean_weight`` (and
  ``nan_row``); the kernel's other fields 0."""
  zero = jnp.zeros_like(xent)
  return RowStats(lse=zero, xent=jnp.where(counted, xent, 0.0),
                  counted=counted, mean_weight=mean_weight,
                  target_mass=zero, support_size=zero,
                  nan_row=jnp.zeros_like(counted) if nan_row is None
                  else nan_row, shift=zero, log_sum=zero,
                  bad_label=jnp.zeros_like(counted) if nan_row is None
                  else nan_row)


def recount(pre: RowStats, st: RowStats, hp: Hyper, reduction: str,
            batch_axes: BatchAxes = None):
  """The factor that makes gradients formed with the denominators of
  ``pre`` those of the rows ``st`` counted: exactly 1 unless a row counted
  in ``pre`` is not in ``st``, else ``d_pre / d_true``. The cross-entropy
  and z-loss terms share that factor unless their two ratios differ (class
  weights and z-loss in a ``"mean"``): then NaN, as no one rescaling is
  exact, except where ``st`` counts no row at all (every gradient is 0
  whatever the factor)."""
  lost = batch_sum((pre.counted & ~st.counted).astype(jnp.int32),
                   batch_axes) > 0
  d_pre = denominators(pre, reduction, batch_axes)
  d_true = denominators(st, reduction, batch_axes)
  ratio = d_pre[0] / d_true[0]
  # Weights summing to 0: the gradient is inf/NaN on counted rows anyway,
  # and rows not counted keep their 0 (no NaN factor over them).
  ratio = jnp.where(jnp.isfinite(ratio), ratio, jnp.ones_like(ratio))
  if hp.z_loss is not None:
    none_left = batch_sum(st.counted.astype(jnp.int32), batch_axes) == 0
    one_factor = (d_pre[1] / d_true[1] == ratio) | none_left
    ratio = jnp.where(one_factor, ratio, jnp.nan)
  return jnp.where(lost, ratio, jnp.ones_like(ratio))


def objective_rows(fn, st: RowStats, entropy, fn_args):
  """``fn(log p_y, entropy, *fn_args)`` per row, 0 on uncounted rows."""
  inputs = _objective_inputs(st, entropy, fn_args)
  log_p = inputs[0]
  f = jnp.asarray(fn(*inputs))
  if f.shape != log_p.shape or not jnp.issubdtype(f.dtype, jnp.floating):
    raise ValueError(
        "the objective fn must map (rows,) log-probabilities and entropies "
        f"to a floating (rows,) array; got {f.dtype}{list(f.shape)} for "
        f"{log_p.shape[0]} rows.")
  return jnp.where(st.counted, f, 0.0)


def reduce_objective(f, st: RowStats, reduction: str,
                     batch_axes: BatchAxes = None):
  """``"none"``: the per-row values ``f``; ``"sum"``: their sum; ``"mean"``:
  the sum over the counted rows' count (0 for none)."""
  if reduction == "none":
    return f
  return batch_sum(f, batch_axes) / denominators(st, reduction,
                                                 batch_axes)[1]


def objective_cotangents(fn, st: RowStats, entropy, fn_args, c_f):
  """For per-row cotangents ``c_f`` of ``f = fn(log p, H, *fn_args)``:
  the row kernel's cotangents (``-d f / d log p`` is that of ``-log p``,
  the ``xent`` of a plain cross-entropy), the entropy's ``d f / d H`` and
  the arguments' gradients, all 0 on uncounted rows (``jax.vjp`` of
  ``fn``, whatever uncounted rows hold)."""
  f, vjp = jax.vjp(fn, *_objective_inputs(st, entropy, fn_args))
  c = jnp.where(st.counted, c_f, 0.0).astype(f.dtype)
  d_lp, d_h, *d_args = vjp(c)

  def keep(a):
    return clean_rows(a, st.counted)

  zero = jnp.zeros_like(st.xent)
  cot = RowCotangents(xent=-keep(d_lp).astype(zero.dtype), z_loss=zero,
                      mean_xent=jnp.zeros((), zero.dtype), scale=zero)
  return cot, keep(d_h).astype(zero.dtype), tuple(keep(a) for a in d_args)


def shape_outputs(out, reduction: str, return_aux: bool,
                  batch_shape: tuple[int, ...], batch_spec=None):
  """Gives per-row outputs (loss for ``"none"``, aux) the batch shape (in
  ``batch_spec`` on Explicit mesh axes, :func:`unflatten_rows`)."""
  loss, aux = out if return_aux else (out, None)
  n = math.prod(batch_shape)
  if reduction == "none":
    loss = unflatten_rows(loss[:n], batch_shape, batch_spec)
  if aux is None:
    return loss
  return loss, jax.tree.map(
      lambda a: unflatten_rows(a[:n], batch_shape, batch_spec), aux)


def unwrap_primals(tree):
  """Values and whether any leaf is perturbed, for ``symbolic_zeros``."""
  is_p = lambda t: isinstance(t, CustomVJPPrimal)  # noqa: E731
  values = jax.tree.map(lambda t: t.value, tree, is_leaf=is_p)
  return values, any(t.perturbed for t in jax.tree.leaves(tree, is_leaf=is_p))


def split_cotangent(g, return_aux: bool):
  """``(g_loss, (g_lse, g_entropy))`` of an output cotangent: the loss's
  dense (a symbolic zero made zeros), the aux's None where zero."""
  g, g_aux = g if return_aux else (g, None)
  if isinstance(g, SymbolicZero):
    g = jnp.zeros(g.shape, g.dtype)
  if g_aux is None:
    return g, (None, None)
  return g, tuple(None if isinstance(a, SymbolicZero) else a
                  for a in (g_aux.lse, g_aux.entropy))
