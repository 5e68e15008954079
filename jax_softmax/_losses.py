"""Cross-entropy losses from logits, with hand-written gradients.

The row kernel here (:func:`row_stats`, :func:`grad_logits`,
:func:`grad_target`, :func:`grad_hyper`) works on a 2-D block of logits
``(rows, classes)`` with the class axis last. ``cross_entropy`` applies it to
all rows at once; the linear model and the fused loss apply it to their own
blocks, so every loss in the package shares one definition of the numerics.

Notation for one row: logits ``z`` (after the soft cap), support
``S = {c : z_c > -inf and not masked}``, ``K = |S|``, ``m = max z``,
``log_s = log sum_S exp(z - m)``, ``lse = m + log_s``,
``nll_c = log_s - (z_c - m) = -log p_c`` (never ``lse - z_c``: that
difference of two large numbers loses precision at ``|z| ~ 1e3``).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

from jax_softmax import _checks
from jax_softmax._primitives import compute_dtype, logsumexp

_NEG_INF = -jnp.inf


class Hyper(NamedTuple):
  """Loss hyperparameters; ``None`` means off (and costs nothing)."""

  label_smoothing: jax.Array | None = None
  z_loss: jax.Array | None = None
  soft_cap: jax.Array | None = None
  class_weights: jax.Array | None = None


class Stats(NamedTuple):
  """Per-row results of the forward pass, all shape ``(rows,)``."""

  lse: jax.Array       # log-sum-exp of the capped logits (0 if uncounted)
  ce: jax.Array        # cross-entropy term of the row loss, 0 if uncounted
  counted: jax.Array   # bool: the row enters the loss
  weight: jax.Array    # the row's share of the mean's denominator
  a: jax.Array         # total target mass: d ce / d z = a * p - t_w
  k: jax.Array         # |S|, the support size (smoothing spreads over it)
  bad: jax.Array       # bool: counted row whose integer label is out of range
  shift: jax.Array | None = None  # the row maximum m (0 if uncounted)
  log_s: jax.Array | None = None  # log sum exp(z - m): p = exp(z - m - log_s)
  exp: jax.Array | None = None    # (rows, C) exp(z - m), when kept


def make_hyper(label_smoothing, z_loss, soft_cap, class_weights,
               num_classes: int, dtype) -> Hyper:
  """Validates hyperparameters; a literal 0 / None switches a term off.

  ``label_smoothing`` must lie in ``[0, 1]``, ``z_loss`` be non-negative
  and ``soft_cap`` positive (None is no cap), all finite; traced values are
  not checked.
  """

  def scalar(v, name, **bounds):
    if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)
                     and v == 0 and name != "soft_cap"):
      return None
    return _checks.scalar_param(v, name, dtype, **bounds)

  cw = None
  if class_weights is not None:
    cw = _checks.as_float_array(class_weights, "class_weights")
    _checks.check_class_weights(cw, num_classes)
    cw = cw.astype(jnp.result_type(cw.dtype, dtype))
  return Hyper(scalar(label_smoothing, "label_smoothing", low=0.0, high=1.0),
               scalar(z_loss, "z_loss", low=0.0),
               scalar(soft_cap, "soft_cap", low=0.0, low_open=True), cw)


def _cap(z, cap):
  """``cap * tanh(z / cap)``, ``-inf`` kept. Where ``|z / cap| < 2**-12``
  that equals ``z`` to within half an ulp (``tanh u = u (1 - u**2 / 3 +
  ...)``), and ``z`` itself is returned: a huge cap (``1e38``, where
  ``z / cap`` underflows) is no cap."""
  u = z / cap
  capped = jnp.where(jnp.abs(u) < 2.0**-12, z, cap * jnp.tanh(u))
  return jnp.where(z == _NEG_INF, _NEG_INF, capped)


def _mul0(a, b):
  """``a * b`` with ``0 * inf = 0``: a term whose coefficient is 0 drops
  out of the loss even where ``b = -log p`` is ``+inf`` (a masked target
  under ``label_smoothing=1`` or a zero class weight), as in the formulas.
  NaN stays NaN. Written as a product so that its derivative in ``a`` is
  ``b`` (second-order gradients through targets)."""
  return a * jnp.where((a == 0) & (b == jnp.inf), 0.0, b)


def _support_logits(z, cmask, hp):
  """Capped logits in the compute dtype, ``-inf`` off the support."""
  zc = z.astype(compute_dtype(z.dtype))
  if hp.soft_cap is not None:
    zc = _cap(zc, hp.soft_cap)
  if cmask is not None:
    zc = jnp.where(cmask, zc, _NEG_INF)
  return zc


def _weighted(x, hp, axis_value=None):
  """``x * class_weights`` (broadcast over rows), or ``x`` without weights."""
  if hp.class_weights is None:
    return x
  if axis_value is not None:
    return x * hp.class_weights[axis_value]
  return x * hp.class_weights.reshape((1,) * (x.ndim - 1) + (-1,))


def label_weights(y, hp: Hyper, num_classes: int, dtype):
  """``class_weights[y]`` per row (labels clipped into range: a bad label's
  row is NaN anyway), or ones without class weights."""
  one = jnp.ones(y.shape, dtype)
  return _weighted(one, hp, jnp.clip(y, 0, num_classes - 1))


class VocabShard(NamedTuple):
  """This device's slice of a class axis split over the mesh axis ``name``.

  Reductions over classes become ``pmax``/``psum`` over ``name``; labels
  are global class ids; ``offset`` is the first global id held here.
  """

  name: str
  offset: jax.Array
  num_classes: int


def _cmax(x, shard: VocabShard | None):
  m = jnp.max(x, axis=-1)
  return m if shard is None else lax.pmax(m, shard.name)


def _csum(x, shard: VocabShard | None):
  s = jnp.sum(x, axis=-1)
  return s if shard is None else lax.psum(s, shard.name)


def _class_ids(n_local: int, shard: VocabShard | None):
  ids = jnp.arange(n_local)
  return ids if shard is None else ids + shard.offset


def _num_classes(n_local: int, shard: VocabShard | None) -> int:
  return n_local if shard is None else shard.num_classes


def _take_target(a, y, shard: VocabShard | None):
  """``a[row, y[row]]`` for global ids ``y`` (0 for out-of-range ids)."""
  n = a.shape[-1]
  local = y if shard is None else y - shard.offset
  v = jnp.take_along_axis(a, jnp.clip(local, 0, n - 1)[:, None], -1)[:, 0]
  if shard is None:
    return v
  return lax.psum(jnp.where((local >= 0) & (local < n), v, 0.0), shard.name)


def _local_weights(hp: Hyper, n_local: int, shard: VocabShard | None):
  """Hyperparameters with this shard's slice of the class weights."""
  if shard is None or hp.class_weights is None:
    return hp
  return hp._replace(class_weights=lax.dynamic_slice_in_dim(
      hp.class_weights, shard.offset, n_local))


def row_stats(z, target, row, cmask, hp: Hyper, is_int: bool,
              shard: VocabShard | None = None, keep_exp: bool = False
              ) -> Stats:
  """Forward pass over a ``(rows, C)`` block.

  Args:
    z: ``(rows, C)`` logits, any floating dtype.
    target: ``(rows,)`` integer labels or ``(rows, C)`` probabilities.
    row: ``(rows,)`` bool, False for rows masked out or ``ignore_index``.
    cmask: ``(rows, C)`` bool class mask, or None.
    hp: hyperparameters.
    is_int: whether ``target`` holds class indices.
    shard: the class axis is split over a mesh axis (integer labels only).
    keep_exp: keep ``exp(z - m)`` for the backward pass. XLA writes it out
      for the sum anyway; keeping it saves the backward an ``exp`` per
      entry (but holds a ``(rows, C)`` float32 array until then).
  """
  num_classes = _num_classes(z.shape[-1], shard)
  zc = _support_logits(z, cmask, hp)
  m = _cmax(zc, shard)
  counted = row & (m != _NEG_INF)           # NaN rows stay counted
  zc = jnp.where(counted[:, None], zc, 0.0)   # uncounted rows: harmless zeros
  m = jnp.where(counted, m, 0.0)
  # (z - m) is formed inside each reduction, never stored as a (rows, C)
  # array of its own: one fewer write and read of the block.
  shifted = zc - m[:, None]
  e = jnp.exp(shifted)
  valid = zc != _NEG_INF
  eps = hp.label_smoothing
  k = _csum(valid.astype(zc.dtype), shard)
  if is_int:
    bad = counted & ((target < 0) | (target >= num_classes))
    z_y = _take_target(zc, target, shard) - m
    # The sum of exp(z - m) is r_y + e_y, r_y over the classes other than
    # the label: nll_y = log(1 + r_y / e_y) keeps a tiny r_y (a confident
    # row: [20, 0] with label 0 gives 2.06e-9, where log_s - z_y rounds to
    # 0). Where e_y underflows, log_s - z_y (no cancellation there).
    not_y = _class_ids(z.shape[-1], shard)[None, :] != target[:, None]
    r_y = _csum(jnp.exp(jnp.where(not_y, shifted, _NEG_INF)), shard)
    e_y = jnp.exp(z_y)
    log_s = jnp.log(r_y + e_y)
    near = z_y > -20.0
    nll_y = jnp.where(near, jnp.log1p(r_y / jnp.where(near, e_y, 1.0)),
                      log_s - z_y)
    nll_y = jnp.where(bad, jnp.nan, nll_y)
    w_y = label_weights(target, hp, num_classes, zc.dtype)
    ce = _mul0(w_y, nll_y)
    a = w_y
    if eps is not None:
      # (eps / K) sum_S w_c nll_c = (W_S log_s - sum_S w_c (z_c - m)) / K
      local = _local_weights(hp, z.shape[-1], shard)
      w_s = _csum(_weighted(valid.astype(zc.dtype), local), shard)
      wz = _csum(_weighted(jnp.where(valid, shifted, 0.0), local), shard)
      smooth = (w_s * log_s - wz) / k
      ce = _mul0(1 - eps, ce) + eps * smooth
      a = (1 - eps) * w_y + eps * w_s / k
    weight = jnp.where(counted, w_y, 0.0)
  else:
    bad = jnp.zeros_like(counted)
    log_s = jnp.log(_csum(e, shard))
    target = _clean_rows(target, counted)
    q = _smoothed_target(target, valid, k, eps)
    wq = _weighted(q, hp)
    nll = log_s[:, None] - shifted
    ce = jnp.sum(_mul0(wq, nll), axis=-1)
    a = jnp.sum(wq, axis=-1)
    weight = counted.astype(zc.dtype)
  ce = jnp.where(counted, ce, 0.0)
  return Stats(jnp.where(counted, m + log_s, 0.0), ce, counted, weight, a, k,
               bad, m, jnp.where(counted, log_s, 0.0),
               e if keep_exp else None)


def _clean_rows(a, counted):
  """``a`` with the rows that are not counted set to 0: what an uncounted
  row holds (NaN, inf) never reaches a sum, nor a gradient through one."""
  return jnp.where(counted.reshape(counted.shape + (1,) * (a.ndim - 1)), a,
                   0)


def _smoothed_target(t, valid, k, eps):
  t = t.astype(k.dtype)
  if eps is None:
    return t
  return (1 - eps) * t + eps * valid / k[:, None]


def _probs(z, cmask, hp, st):
  """Capped logits, ``p`` and ``-log p``, recomputed from the row stats.

  ``p = exp((z - m) - log_s)``, never ``exp(z - lse)``: ``lse`` rounded to
  float32 would shift every exponent by up to ``|lse| * 2**-24``.
  """
  zc = _support_logits(z, cmask, hp)
  zc = jnp.where(st.counted[:, None], zc, 0.0)
  nll = st.log_s[:, None] - (zc - st.shift[:, None])
  return zc, jnp.exp(-nll), nll


def _grad_capped(zc, p, target, hp: Hyper, is_int: bool, st: Stats,
                 c_ce, c_z, shard: VocabShard | None = None):
  """``d loss / d zc`` with respect to the capped logits ``zc`` (which
  may be None when there is no smoothing: only the support needs it)."""
  eps = hp.label_smoothing
  coef = c_ce * st.a
  if hp.z_loss is not None:
    coef = coef + c_z * 2 * hp.z_loss * st.lse
  if is_int:
    onehot = _class_ids(p.shape[-1], shard)[None, :] == target[:, None]
    ones = _weighted(jnp.ones_like(p), _local_weights(hp, p.shape[-1],
                                                      shard))
    tw = jnp.where(onehot, ones, 0.0)
    if eps is not None:
      support = jnp.where(zc != _NEG_INF, ones, 0.0)
      tw = (1 - eps) * tw + eps * support / st.k[:, None]
  else:
    valid = None if eps is None else zc != _NEG_INF
    tw = _weighted(_smoothed_target(target, valid, st.k, eps), hp)
  return coef[:, None] * p - c_ce[:, None] * tw


def grad_logits(z, target, cmask, hp: Hyper, is_int: bool, st: Stats,
                c_ce, c_z, shard: VocabShard | None = None):
  """``d loss / d z`` for a block, in the compute dtype.

  ``c_ce`` and ``c_z`` are per-row cotangents ``(rows,)`` of the
  cross-entropy and z-loss terms (already scaled by the reduction).
  Exactly 0 on uncounted rows and masked classes, NaN on bad-label rows.
  """
  if (st.exp is not None and hp.label_smoothing is None
      and hp.soft_cap is None):
    # p from the kept exp(z - m): no second exp, no read of z.
    zc, p = None, st.exp * jnp.exp(-cast(jax.Array, st.log_s))[:, None]
  else:
    zc, p, _ = _probs(z, cmask, hp, st)
  g = _grad_capped(zc, p, target, hp, is_int, st, c_ce, c_z, shard)
  if hp.soft_cap is not None:
    assert zc is not None  # the kept-exp shortcut excludes a soft cap
    g = g * jnp.where(zc != _NEG_INF, 1 - jnp.square(zc / hp.soft_cap), 0.0)
  keep = st.counted[:, None]
  if cmask is not None:
    keep = keep & cmask
  g = jnp.where(keep, g, 0.0)
  return jnp.where(st.bad[:, None], jnp.nan, g)


def grad_target(z, target, cmask, hp: Hyper, st: Stats, c_ce):
  """``d loss / d t`` for probability targets: ``(1-eps) w_c nll_c`` on the
  support, 0 off it and on uncounted rows."""
  zc, _, nll = _probs(z, cmask, hp, st)
  scale = 1.0 if hp.label_smoothing is None else 1 - hp.label_smoothing
  dt = c_ce[:, None] * scale * _weighted(nll, hp)
  return jnp.where((zc != _NEG_INF) & st.counted[:, None], dt, 0.0)


def grad_hyper(z, target, cmask, hp: Hyper, is_int: bool, st: Stats,
               c_ce, c_z, mean_ce, shard: VocabShard | None = None) -> Hyper:
  """Gradients of the loss with respect to the hyperparameters.

  Under ``jit`` XLA drops the ones that are not used. ``mean_ce`` is the
  cross-entropy mean for ``reduction="mean"`` with integer labels (the
  class weights also enter its denominator), else 0. With ``shard`` the
  gradients are those of the whole vocabulary (summed over the shards).
  """
  zc, p, nll = _probs(z, cmask, hp, st)
  valid = zc != _NEG_INF
  nll = jnp.where(valid, nll, 0.0)
  eps = hp.label_smoothing
  counted = st.counted
  d_eps = d_z = d_cap = d_w = None
  n_local = z.shape[-1]
  n_cls = _num_classes(n_local, shard)
  local_hp = _local_weights(hp, n_local, shard)
  if is_int:
    yc = jnp.clip(target, 0, n_cls - 1)
    nll_y = jnp.where(st.bad, jnp.nan, _take_target(nll, target, shard))
  if eps is not None:
    if is_int:
      w_y = label_weights(target, hp, n_cls, nll_y.dtype)
      smooth = _csum(_weighted(nll, local_hp), shard) / st.k
      per_row = smooth - w_y * nll_y
    else:
      dq = valid / st.k[:, None] - target
      per_row = jnp.sum(_weighted(dq * nll, hp), axis=-1)
    d_eps = jnp.sum(jnp.where(counted, c_ce * per_row, 0.0))
  if hp.z_loss is not None:
    d_z = jnp.sum(jnp.where(counted, (c_z * st.lse) * st.lse, 0.0))
  if hp.soft_cap is not None:
    g = _grad_capped(zc, p, target, hp, is_int, st, c_ce, c_z, shard)
    # d zc / d cap for zc = cap * tanh(z / cap).
    u = jnp.where(valid & counted[:, None], z.astype(zc.dtype),
                  0.0) / hp.soft_cap
    th = jnp.tanh(u)
    dcap = jnp.where(valid, th - u * (1 - jnp.square(th)), 0.0)
    d_cap = jnp.sum(jnp.where(valid & counted[:, None], g * dcap, 0.0))
    d_cap = d_cap if shard is None else lax.psum(d_cap, shard.name)
  if hp.class_weights is not None:
    rows = jnp.where(counted, c_ce, 0.0)
    if is_int:
      smooth_w = 0.0 if eps is None else eps
      per_y = rows * ((1 - smooth_w) * nll_y - mean_ce)
      d_w = jax.ops.segment_sum(per_y, yc, num_segments=n_cls)
      if eps is not None:
        d_local = jnp.sum(rows[:, None] * eps * nll / st.k[:, None], 0)
        if shard is not None:  # this shard's classes, summed over shards
          d_local = lax.psum(lax.dynamic_update_slice_in_dim(
              jnp.zeros_like(d_w), d_local, shard.offset, 0), shard.name)
        d_w = d_w + d_local
    else:
      q = _smoothed_target(target, valid, st.k, eps)
      d_w = jnp.sum(rows[:, None] * _mul0(q, nll), 0)
    d_w = d_w.astype(hp.class_weights.dtype)
  return Hyper(d_eps, d_z, d_cap, d_w)


class LossAux(NamedTuple):
  """Per-row by-products of a loss, all of the batch shape.

  Filled for every row, uncounted ones included (``correct`` is False
  there). ``lse`` and ``entropy`` are differentiable; ``argmax`` and
  ``correct`` are not.

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


def _aux_probs(z, cmask, hp: Hyper, shard: VocabShard | None):
  """Capped logits, support, ``log p`` (0 off the support) and
  ``lse`` of every row, counted or not; an empty row has ``lse = -inf``
  and no support. No NaN or ``0 * inf`` is formed on the way."""
  zc = _support_logits(z, cmask, hp)
  valid = zc != _NEG_INF
  m = _cmax(zc, shard)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  shifted = zc - m[:, None]
  log_s = jnp.log(_csum(jnp.exp(shifted), shard))
  safe = jnp.where(log_s == _NEG_INF, 0.0, log_s)[:, None]
  log_p = jnp.where(valid, shifted - safe, 0.0)
  return zc, valid, log_p, m + log_s


def row_aux(z, target, counted, cmask, hp: Hyper, is_int: bool,
            shard: VocabShard | None = None) -> LossAux:
  """:class:`LossAux` of a ``(rows, C)`` block (one more pass over it).

  A row with an empty support has ``lse = -inf`` and entropy 0 (the
  entropy of no outcome; its gradient is 0 too)."""
  _, valid, log_p, lse = _aux_probs(z, cmask, hp, shard)
  p = jnp.where(valid, jnp.exp(log_p), 0.0)
  entropy = -_csum(p * log_p, shard)
  raw = z if cmask is None else jnp.where(cmask, z, _NEG_INF)
  top = jnp.argmax(raw, axis=-1)
  if shard is not None:  # first global maximum: ties go to the lowest id
    best = jnp.max(raw, axis=-1)
    top = jnp.where(best == lax.pmax(best, shard.name), top + shard.offset,
                    shard.num_classes)
    top = lax.pmin(top, shard.name)
  want = target if is_int else jnp.argmax(target, axis=-1)
  return LossAux(lse, entropy, top, counted & (top == want))


def grad_aux(z, cmask, hp: Hyper, aux: LossAux, g_lse, g_ent,
             shard: VocabShard | None = None):
  """``d (sum g_lse * lse + sum g_ent * entropy) / d z`` for a block.

  ``d lse / d z = p`` and ``d H / d z = -p (log p + H)``, on the support.
  ``g_lse`` / ``g_ent`` are ``(rows,)`` cotangents or None (zero).
  """
  zc, valid, log_p, _ = _aux_probs(z, cmask, hp, shard)
  p = jnp.where(valid, jnp.exp(log_p), 0.0)
  g = jnp.zeros_like(p)
  if g_lse is not None:
    g = g + g_lse[:, None] * p
  if g_ent is not None:
    g = g - g_ent[:, None] * p * (log_p + aux.entropy[:, None])
  if hp.soft_cap is not None:
    g = g * jnp.where(valid, 1 - jnp.square(zc / hp.soft_cap), 0.0)
  return jnp.where(valid, g, 0.0)


def unwrap_primals(tree):
  """Values and whether any leaf is perturbed, for ``symbolic_zeros``."""
  is_p = lambda t: isinstance(t, CustomVJPPrimal)  # noqa: E731
  values = jax.tree.map(lambda t: t.value, tree, is_leaf=is_p)
  return values, any(t.perturbed for t in jax.tree.leaves(tree, is_leaf=is_p))


def aux_cotangents(ct: LossAux):
  """``(g_lse, g_entropy)`` from an aux cotangent, None where zero."""
  return tuple(None if isinstance(g, SymbolicZero) else g
               for g in (ct.lse, ct.entropy))


# --------------------------------------------------------------------------
# reductions shared by every loss


def _bsum(x, batch_axis: str | tuple[str, ...] | None):
  """Sum over rows, and over the mesh axis ``batch_axis`` if given."""
  s = jnp.sum(x)
  return s if batch_axis is None else lax.psum(s, batch_axis)


def reduce_rows(st: Stats, hp: Hyper, reduction: str,
                batch_axis: str | tuple[str, ...] | None = None
                ) -> jax.Array:
  """Applies ``reduction`` to the per-row terms of ``st``.

  With ``batch_axis`` the sums (and the mean's denominators) run over the
  global batch split over that mesh axis. The z-loss term is formed per
  row as ``(z_loss * lse) * lse``, which stays finite wherever the result
  does (``lse**2`` alone overflows float32 beyond ``|lse| = 1.8e19``).
  """
  ce = st.ce if reduction == "none" else _bsum(st.ce, batch_axis)
  d_ce, d_z = _denominators(st, reduction, batch_axis)
  ce = ce / d_ce
  if hp.z_loss is None:
    return ce
  z_rows = jnp.where(st.counted, (hp.z_loss * st.lse) * st.lse, 0.0)
  if reduction == "none":
    return ce + z_rows
  return ce + _bsum(z_rows, batch_axis) / d_z


def _denominators(st: Stats, reduction: str,
                  batch_axis: str | tuple[str, ...] | None):
  """Divisors of the summed cross-entropy and z-loss terms: for
  ``"mean"``, ``sum w_y`` and the count over counted rows, else 1.

  A batch with no counted row has a zero numerator too: its mean is 0, not
  NaN. Only that case is guarded: class weights that sum to 0 over counted
  rows divide by 0 (NaN or inf, as PyTorch).
  """
  one = jnp.ones((), st.ce.dtype)
  if reduction != "mean":
    return one, one
  n = _bsum(st.counted.astype(st.ce.dtype), batch_axis)
  none = n == 0
  return (jnp.where(none, one, _bsum(st.weight, batch_axis)),
          jnp.where(none, one, n))


def row_cotangents(st: Stats, reduction: str, g, is_int: bool,
                   batch_axis: str | tuple[str, ...] | None = None
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-row cotangents ``(c_ce, c_z, mean_ce)`` of a reduced loss.

  ``mean_ce`` is the cross-entropy mean when the class weights enter the
  denominator (``"mean"`` with integer labels), else 0.
  """
  g = jnp.asarray(g, st.ce.dtype)
  d_ce, d_z = _denominators(st, reduction, batch_axis)
  c_ce, c_z = g / d_ce, g / d_z
  mean_ce = jnp.zeros((), st.ce.dtype)
  if reduction == "mean" and is_int:
    mean_ce = _bsum(st.ce, batch_axis) / d_ce
  c_ce = jnp.where(st.counted, jnp.broadcast_to(c_ce, st.ce.shape), 0.0)
  c_z = jnp.where(st.counted, jnp.broadcast_to(c_z, st.ce.shape), 0.0)
  return c_ce, c_z, mean_ce


# --------------------------------------------------------------------------
# cross_entropy


class _Config(NamedTuple):
  reduction: str
  is_int: bool
  aux: bool = False


def _cross_entropy_outputs(cfg, z, target, row, cmask, hp):
  st = row_stats(z, target, row, cmask, hp, cfg.is_int, keep_exp=True)
  loss = reduce_rows(st, hp, cfg.reduction)
  if not cfg.aux:
    return loss, st, None
  aux = row_aux(z, target, st.counted, cmask, hp, cfg.is_int)
  return (loss, aux), st, aux


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _cross_entropy(cfg, z, target, row, cmask, hp):
  return _cross_entropy_outputs(cfg, z, target, row, cmask, hp)[0]


def _cross_entropy_fwd(cfg, *args):
  z, target, row, cmask, hp = (unwrap_primals(a)[0] for a in args)
  out, st, aux = _cross_entropy_outputs(cfg, z, target, row, cmask, hp)
  if not cfg.is_int:
    target = _clean_rows(target, st.counted)
  return out, (z, target, cmask, hp, st, aux)


def _cross_entropy_bwd(cfg, res, g):
  z, target, cmask, hp, st, aux = res
  g, g_aux = g if cfg.aux else (g, None)
  if isinstance(g, SymbolicZero):
    g = jnp.zeros(g.shape, g.dtype)
  c_ce, c_z, mean_ce = row_cotangents(st, cfg.reduction, g, cfg.is_int)
  dz = grad_logits(z, target, cmask, hp, cfg.is_int, st, c_ce, c_z)
  if g_aux is not None:
    g_lse, g_ent = aux_cotangents(g_aux)
    if g_lse is not None or g_ent is not None:
      dz = dz + grad_aux(z, cmask, hp, aux, g_lse, g_ent)
  dt = None
  if not cfg.is_int:
    dt = grad_target(z, target, cmask, hp, st, c_ce).astype(target.dtype)
  dhp = grad_hyper(z, target, cmask, hp, cfg.is_int, st, c_ce, c_z, mean_ce)
  return dz.astype(z.dtype), dt, None, None, dhp


_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd,
                      symbolic_zeros=True)
# Compiled once per configuration and shapes, so eager calls do not run
# the kernel op by op (under an outer jit this is inlined).
_cross_entropy_jit = jax.jit(_cross_entropy, static_argnums=0)


class _Rows(NamedTuple):
  """Logits laid out as ``(rows, classes)`` with their masks and labels."""

  z: jax.Array
  target: jax.Array
  row: jax.Array
  cmask: jax.Array | None
  batch_shape: tuple[int, ...]
  is_int: bool


def _to_rows(logits, labels, axis, where, ignore_index, check_labels,
             name: str = "logits") -> _Rows:
  """Validates and lays out the arguments of a loss from logits."""
  logits = _checks.as_float_array(logits, name)
  if logits.ndim == 0:
    raise ValueError(f"{name} must have at least one (class) axis; got a "
                     "scalar.")
  axes = _checks.normalize_axes(axis, logits.ndim)
  batch_axes = tuple(a for a in range(logits.ndim) if a not in axes)
  batch_shape = tuple(logits.shape[a] for a in batch_axes)
  num_classes = 1
  for a in axes:
    num_classes *= logits.shape[a]
  perm = batch_axes + axes

  def class_layout(x):
    return jnp.transpose(x, perm).reshape(-1, num_classes)

  dtype = _checks.dtype_of(labels)
  is_int = bool(jnp.issubdtype(dtype, jnp.integer)) and dtype != np.bool_
  if not is_int and not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        "labels must be integer class indices or floating probabilities; "
        f"got dtype {dtype}.")
  row = jnp.ones(batch_shape, bool)
  cmask = None
  if where is not None:
    mask = _checks.as_bool_mask(where)
    if mask.ndim == logits.ndim:
      cmask = class_layout(_checks.broadcast_mask(mask, logits.shape,
                                                  name))
    elif not is_int:
      row = _checks.broadcast_mask(mask, batch_shape, "batch")
  if is_int:
    has_class = None if cmask is None else jnp.any(
        cmask, axis=-1).reshape(batch_shape)   # rows with no class left
    labels, row = _checks.int_label_rows(
        labels, batch_shape, None if where is None or cmask is not None
        else where, ignore_index, num_classes, check_labels, has_class)
    target = labels.reshape(-1)
  else:
    labels = jnp.asarray(labels)
    if labels.shape != logits.shape:
      raise ValueError(
          f"probability labels must have the logits' shape {logits.shape}; "
          f"got {labels.shape}.")
    target = class_layout(labels)
  return _Rows(class_layout(logits), target, row.reshape(-1), cmask,
               batch_shape, is_int)


def cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    axis: int | tuple[int, ...] = -1,
    where: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = -100,
    label_smoothing: jax.typing.ArrayLike = 0.0,
    class_weights: jax.typing.ArrayLike | None = None,
    z_loss: jax.typing.ArrayLike = 0.0,
    soft_cap: jax.typing.ArrayLike | None = None,
    reduction: str = "mean",
    check_labels: bool = False,
    return_aux: bool = False,
) -> jax.Array | tuple[jax.Array, LossAux]:
  r"""Softmax cross-entropy from logits, with a hand-written gradient.

  With ``p = softmax(z)`` over the support ``S`` (classes whose logit is not
  ``-inf`` and not masked), ``K = |S|``, class weights ``w`` (default 1) and
  smoothing ``eps``, the loss of a row with integer label ``y`` is

  .. math::
    \ell = (1-\varepsilon)\, w_y (-\log p_y)
      + \frac{\varepsilon}{K} \sum_{c \in S} w_c (-\log p_c)

  and with probability targets ``t`` (``q = (1-eps) t + eps/K`` on ``S``)

  .. math::
    \ell = -\sum_c w_c\, q_c \log p_c ,

  computed as ``-log p_c = log sum_S exp(z - m) - (z_c - m)`` with ``m``
  the row maximum. ``z_loss`` adds ``z_loss * lse**2`` per row;
  ``soft_cap`` first maps ``z -> soft_cap * tanh(z / soft_cap)`` (``-inf``
  stays ``-inf``), and lse and z-loss use the capped logits.

  Reductions: ``"none"`` returns ``ℓ + z_loss * lse**2`` per row (0 on
  uncounted rows); ``"sum"`` sums it; ``"mean"`` divides the summed ``ℓ``
  by ``sum w_y`` over counted rows (integer labels; the row count for
  probability targets) and the summed z-loss by the counted-row count. An
  all-ignored batch gives 0. This is ``torch.nn.functional.cross_entropy``,
  except that smoothing spreads over ``S`` only and the empty mean is 0.

  The gradient is ``(a p - t_w) * cotangent`` per row, ``a`` the row's total
  target weight and ``t_w`` the weighted target distribution (plus
  ``2 z_loss lse p`` and the cap's ``1 - tanh**2`` factor). Hyperparameters
  may be traced; their gradients are exact, and so is the gradient with
  respect to probability targets (``(1-eps) w_c (-log p_c)`` on ``S``, 0
  off it).

  Args:
    logits: ``(..., classes)`` floating logits (any dtype; computed in
      float32 or wider).
    labels: integer class indices of the logits' shape without the class
      axis, or floating probabilities of the logits' shape.
    axis: the class axis (int, or a tuple of axes flattened into one).
    where: boolean mask. Of the logits' rank: a class mask (masked classes
      act as ``-inf`` logits). Otherwise a row mask broadcast to the batch
      shape. A row with no class left counts as ignored.
    ignore_index: integer label whose rows are ignored (default ``-100``,
      PyTorch's; None for none). Labels of any integer dtype work for any
      class count.
    label_smoothing: ``eps`` in ``[0, 1]``.
    class_weights: ``(classes,)`` weights ``w``. A term whose weight is 0
      is 0 even where ``-log p`` is ``+inf``; weights summing to 0 over the
      counted rows make the ``"mean"`` NaN (0 / 0), as in PyTorch.
    z_loss: coefficient ``>= 0`` of ``lse**2``.
    soft_cap: positive finite cap, or None (a huge cap is no cap).
    reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    check_labels: also check traced integer labels, through
      ``jax.experimental.checkify``: run the caller under
      ``checkify.checkify(jax.jit(f))`` and call ``err.throw()``.
    return_aux: also return a :class:`LossAux` of per-row ``lse``,
      ``entropy``, ``argmax`` and ``correct`` (computed in the same call;
      ``lse`` and ``entropy`` are differentiable, with hand-written
      gradients; hyperparameter gradients cover the loss only).

  Returns:
    A scalar (``"mean"``, ``"sum"``) or the batch-shaped per-row loss
    (``"none"``), of dtype ``result_type(logits, float32)``; with
    ``return_aux=True``, ``(loss, aux)``.

    Special values, per row: an uncounted row (masked, ``ignore_index``, no
    class left) gives loss 0 and gradient exactly 0 whatever it holds; NaN
    or ``+inf`` in a counted row gives NaN loss and gradient for that row
    only; a target logit of ``-inf`` (or a masked target) gives ``+inf`` with
    a finite gradient; ``-inf`` non-target logits get gradient 0; a label
    outside ``[0, classes)`` that is not ``ignore_index`` gives NaN, and
    raises ``ValueError`` naming it and its position when labels are
    concrete (or with ``check_labels=True`` under checkify).

  Raises:
    TypeError: non-floating logits, labels neither integer nor floating,
      non-boolean ``where``.
    ValueError: bad ``axis``, shapes, ``reduction``, or a bad concrete
      label.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jax_softmax import cross_entropy
    >>> logits = jnp.array([[1000.0, 0.0], [0.0, -1000.0]])
    >>> cross_entropy(logits, jnp.array([1, 1]), reduction="none")
    Array([1000., 1000.], dtype=float32)

  Note:
    A ``jax.custom_vjp`` function: reverse mode (``grad``, ``jacrev``) is
    supported, and so are second derivatives through the hand-written
    backward, in reverse (grad of grad, ``jax.jacrev(jax.grad(f))``) or
    forward mode (``jax.hessian``, ``jax.jvp(jax.grad(f), ...)``); a
    direct ``jax.jvp`` / ``jax.jacfwd`` of the loss is not.
  """
  _checks.check_reduction(reduction)
  r = _to_rows(logits, labels, axis, where, ignore_index, check_labels)
  hp = make_hyper(label_smoothing, z_loss, soft_cap, class_weights,
                  r.z.shape[-1], compute_dtype(r.z.dtype))
  out = _cross_entropy_jit(_Config(reduction, r.is_int, return_aux), r.z,
                       r.target, r.row, r.cmask, hp)
  return shape_outputs(out, reduction, return_aux, r.batch_shape)


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


def _optax_drop_in(logits, labels, axis, where) -> jax.Array:
  """Per-row :func:`cross_entropy` with optax's reading of ``where``.

  optax drops masked classes from the sum over classes: probability mass
  on a masked class is left out (here: zeroed before the loss), and a
  masked integer target is scored by its raw logit, ``lse - z_y`` with
  ``lse`` over the unmasked classes (its gradient ``p - onehot(y)``
  reaches the masked target). ``cross_entropy`` itself gives ``+inf``
  for both.
  """
  r = _to_rows(logits, labels, axis, where, None, False)
  target = r.target
  if r.cmask is not None and not r.is_int:
    target = jnp.where(r.cmask, target, 0.0)
  hp = make_hyper(0.0, 0.0, None, None, r.z.shape[-1],
                  compute_dtype(r.z.dtype))
  out = _cross_entropy_jit(_Config("none", r.is_int), r.z, target, r.row,
                       r.cmask, hp)
  if r.cmask is not None and r.is_int:
    n = r.z.shape[-1]
    in_range = (target >= 0) & (target < n)
    y = jnp.clip(target, 0, n - 1)[:, None]
    masked = in_range & ~jnp.take_along_axis(r.cmask, y, -1)[:, 0] & (
        jnp.any(r.cmask, axis=-1))
    z_y = jnp.take_along_axis(r.z, y, -1)[:, 0]
    raw = logsumexp(r.z, axis=-1, where=r.cmask) - z_y
    out = jnp.where(masked & r.row, raw.astype(out.dtype), out)
  return out.reshape(r.batch_shape)


def softmax_cross_entropy_with_integer_labels(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  """Drop-in for ``optax.softmax_cross_entropy_with_integer_labels``.

  Per-example ``-log softmax(logits)[label]`` of the batch shape, with a
  hand-written gradient. Same signature and results as optax wherever
  optax's result is finite and correct, ``where`` masks included (a class
  mask that hides the target scores it by its raw logit, as optax does).
  Departures: a label outside ``[0, classes)`` gives NaN (optax wraps
  negative labels and clips large ones), there is no ``ignore_index``, and
  the loss is float32 for bfloat16/float16 logits.
  """
  return _optax_drop_in(logits, labels, axis, where)


def softmax_cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  """Drop-in for ``optax.softmax_cross_entropy`` (probability labels).

  ``-sum_c labels_c log softmax(logits)_c`` per example, with a
  hand-written gradient. Like optax it accepts integer (one-hot) labels
  and labels that broadcast to the logits' shape, and leaves masked
  classes (``where`` of the logits' rank) out of the sum. Departures:
  ``-inf`` logits on classes with zero target mass give a finite loss
  (optax: NaN), and the loss is float32 for bfloat16/float16 logits. The
  gradient with respect to ``labels`` is exact.
  """
  z = _checks.as_float_array(logits, "logits")
  t = jnp.asarray(labels)
  if t.dtype == jnp.bool_ or not (jnp.issubdtype(t.dtype, jnp.integer) or
                                  jnp.issubdtype(t.dtype, jnp.floating)):
    raise TypeError("labels must be probabilities (floating or integer "
                    f"one-hot); got dtype {t.dtype}.")
  if not jnp.issubdtype(t.dtype, jnp.floating):
    t = t.astype(compute_dtype(z.dtype))
  try:
    t = jnp.broadcast_to(t, z.shape)
  except ValueError:
    raise ValueError(f"labels of shape {t.shape} do not broadcast to the "
                     f"logits' shape {z.shape}.") from None
  return _optax_drop_in(z, t, axis, where)


# --------------------------------------------------------------------------
# nll_loss


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _nll(reduction, lp, y, row, cmask, hp):
  return _nll_fwd(reduction, lp, y, row, cmask, hp)[0]


def _nll_fwd(reduction, lp, y, row, cmask, hp):
  num_classes = lp.shape[-1]
  yc = jnp.clip(y, 0, num_classes - 1)
  counted = row if cmask is None else row & jnp.any(cmask, axis=-1)
  bad = counted & ((y < 0) | (y >= num_classes))
  lp_y = jnp.take_along_axis(lp, yc[:, None], axis=-1)[:, 0]
  lp_y = lp_y.astype(compute_dtype(lp.dtype))
  if cmask is not None:
    lp_y = jnp.where(jnp.take_along_axis(cmask, yc[:, None], -1)[:, 0],
                     lp_y, _NEG_INF)
  # Uncounted rows may hold anything: their lp_y reaches no gradient.
  lp_y = jnp.where(counted, lp_y, 0.0)
  w_y = label_weights(y, hp, num_classes, lp_y.dtype)
  nll = jnp.where(counted, jnp.where(bad, jnp.nan, _mul0(w_y, -lp_y)), 0.0)
  zero = jnp.zeros_like(nll)
  st = Stats(zero, nll, counted, jnp.where(counted, w_y, 0.0), zero, zero,
             bad)
  return reduce_rows(st, hp, reduction), (lp, y, cmask, hp, st, lp_y)


def _nll_bwd(reduction, res, g):
  lp, y, cmask, hp, st, lp_y = res
  c, _, mean = row_cotangents(st, reduction, g, True)
  yc = jnp.clip(y, 0, lp.shape[-1] - 1)
  w_y = label_weights(y, hp, lp.shape[-1], c.dtype)
  onehot = jnp.arange(lp.shape[-1])[None, :] == y[:, None]
  d = jnp.where(onehot, -(c * w_y)[:, None], 0.0)
  if cmask is not None:
    d = jnp.where(cmask, d, 0.0)
  nan_row = st.counted & jnp.isnan(st.ce)
  d = jnp.where(nan_row[:, None], jnp.nan, d)
  d_w = None
  if hp.class_weights is not None:
    d_w = jax.ops.segment_sum(c * (-lp_y - mean), yc,
                              num_segments=lp.shape[-1])
    d_w = d_w.astype(hp.class_weights.dtype)
  return d.astype(lp.dtype), None, None, None, Hyper(class_weights=d_w)


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
    axis, where, ignore_index, class_weights, reduction, check_labels: as in
      :func:`cross_entropy` (a masked target class gives ``+inf``).

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
  r = _to_rows(log_probs, labels, axis, where, ignore_index, check_labels,
               name="log_probs")
  if not r.is_int:
    raise TypeError("nll_loss takes integer labels; got dtype "
                    f"{jnp.asarray(labels).dtype}.")
  hp = make_hyper(0.0, 0.0, None, class_weights, r.z.shape[-1],
                  compute_dtype(r.z.dtype))
  out = _nll_jit(reduction, r.z, r.target, r.row, r.cmask, hp)
  return out.reshape(r.batch_shape) if reduction == "none" else out
