"""Reductions of per-row terms and the per-row cotangents they give back.

Shared by every loss: :func:`reduce_rows` turns :class:`RowStats` into the
loss, :func:`row_cotangents` turns the loss's cotangent into per-row ones
(:class:`RowCotangents`) for the kernel's gradient functions. With
``batch_axes`` the rows are this device's share of a batch split over those
mesh axes (the sums are global).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

from jax_softmax._kernel import Hyper, RowCotangents, RowStats
from jax_softmax._sharded import BatchAxes, batch_sum


def reduce_rows(st: RowStats, hp: Hyper, reduction: str,
                batch_axes: BatchAxes = None) -> jax.Array:
  """Applies ``reduction`` to the per-row terms of ``st``.

  The z-loss term is formed per row as ``(z_loss * lse) * lse``, which
  stays finite wherever the result does (``lse**2`` alone overflows
  float32 beyond ``|lse| = 1.8e19``).
  """
  xent = st.xent if reduction == "none" else batch_sum(st.xent, batch_axes)
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
                   batch_axes: BatchAxes = None) -> RowCotangents:
  """Per-row cotangents of the loss ``reduce_rows(st, ...)`` for its
  cotangent ``g``. Only ``counted``, ``mean_weight`` (and, for
  ``mean_xent``, ``xent``) of ``st`` are read."""
  g = jnp.asarray(g, st.xent.dtype)
  d_xent, d_z = denominators(st, reduction, batch_axes)
  mean_xent = jnp.zeros((), st.xent.dtype)
  if reduction == "mean" and int_labels:
    mean_xent = batch_sum(st.xent, batch_axes) / d_xent

  def per_row(c):
    return jnp.where(st.counted, jnp.broadcast_to(c, st.xent.shape), 0.0)

  return RowCotangents(per_row(g / d_xent), per_row(g / d_z), mean_xent)


def shape_outputs(out, reduction: str, return_aux: bool,
                  batch_shape: tuple[int, ...]):
  """Gives per-row outputs (loss for ``"none"``, aux) the batch shape."""
  loss, aux = out if return_aux else (out, None)
  n = math.prod(batch_shape)
  if reduction == "none":
    loss = loss[:n].reshape(batch_shape)
  if aux is None:
    return loss
  return loss, jax.tree.map(lambda a: a[:n].reshape(batch_shape), aux)


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
