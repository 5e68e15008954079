"""The row kernel: one definition of the cross-entropy numerics.

Every loss of the package applies these functions to a 2-D block of logits
``(rows, classes)``, class axis last: :func:`cross_entropy` to all rows at
once, the linear model to its product, the fused loss to one chunk at a
time. The contract:

* :func:`row_stats` -> :class:`RowStats` (forward pass, per row);
* :func:`grad_logits`, :func:`grad_target` (backward, given per-row
  cotangents from :mod:`jax_softmax._reduce`), and in
  :mod:`jax_softmax._hypergrad` the hyperparameters' gradients;
* a ``classes`` object (:class:`Classes`, or the vocabulary-sharded one of
  :mod:`jax_softmax._sharded`) does every max/sum/take over the class axis.

Notation for one row: logits ``z`` (after the soft cap), support
``S = {c : z_c > -inf and not masked}``, ``K = |S|``, ``m = max z``,
``log_s = log sum_S exp(z - m)``, ``lse = m + log_s``,
``nll_c = log_s - (z_c - m) = -log p_c`` (never ``lse - z_c``: that
difference of two large numbers loses precision at ``|z| ~ 1e3``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_softmax import _checks
from jax_softmax._numerics import (
  NEG_INF,
  clean_rows,
  compute_dtype,
  div_scalar,
  explicit_spec,
  log_of_sum,
  mul0,
  rows_sharding,
  sharded_like,
  shift_exp,
  soft_cap,
)


class Hyper(NamedTuple):
  """Loss hyperparameters; ``None`` means off (and costs nothing)."""

  label_smoothing: jax.Array | None = None
  z_loss: jax.Array | None = None
  soft_cap: jax.Array | None = None
  class_weights: jax.Array | None = None
  temperature: jax.Array | None = None


def make_hyper(label_smoothing, z_loss, cap, class_weights,
               num_classes: int, dtype, temperature=1.0) -> Hyper:
  """Validates hyperparameters; a literal 0 / None (a temperature of 1)
  switches a term off.

  ``label_smoothing`` must lie in ``[0, 1]``, ``z_loss`` be non-negative,
  ``cap`` (``soft_cap``) and ``temperature`` positive (a cap of None is no
  cap), all finite; traced values are not checked.
  """

  def scalar(v, name, off=0, **bounds):
    if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)
                     and v == off and name != "soft_cap"):
      return None
    return _checks.scalar_param(v, name, dtype, **bounds)

  cw = None
  if class_weights is not None:
    cw = _checks.class_weights(class_weights, num_classes, dtype)
  return Hyper(scalar(label_smoothing, "label_smoothing", low=0.0, high=1.0),
               scalar(z_loss, "z_loss", low=0.0),
               scalar(cap, "soft_cap", low=0.0, low_open=True), cw,
               scalar(temperature, "temperature", off=1, low=0.0,
                      low_open=True))


class Classes:
  """The class axis of a ``(rows, C)`` block, held whole on this device.

  Every reduction over classes goes through this object, so that the
  vocabulary-sharded subclass (:mod:`jax_softmax._sharded`) changes them
  all at once. Labels are global class ids; ``offset`` is the first one
  held here.
  """

  def __init__(self, n_local: int):
    self.n_local = n_local
    self.num_classes = n_local
    self.offset: jax.Array | int = 0

  def max(self, x):
    # Of no class: -inf (floats), the lowest integer (counts).
    low = (-jnp.inf if jnp.issubdtype(x.dtype, jnp.floating)
           else jnp.iinfo(x.dtype).min)
    return jnp.max(x, axis=-1, initial=low)

  def sum(self, x):
    return jnp.sum(x, axis=-1)

  def total(self, x):
    """A scalar's sum over the shards of the class axis."""
    return x

  def ids(self):
    """The global ids of the classes held here, ``(C,)``."""
    return jnp.arange(self.n_local) + self.offset

  def is_label(self, y):
    """``(rows, C)`` bool: True at each row's global label ``y``."""
    return self.ids()[None, :] == y[:, None]

  def take(self, a, y):
    """``a[row, y[row]]`` for global ids ``y`` (0 for out-of-range ids)."""
    local = y - self.offset
    v = take_rows(a, jnp.clip(local, 0, self.n_local - 1))
    return self.sum(jnp.where((local >= 0) & (local < self.n_local), v,
                              0.0)[:, None])

  def log_sum(self, shifted, e):
    """``log sum_c e_c`` for ``e = exp(shifted)``, ``shifted = z - m``: the
    terms at the maximum (``shifted == 0``) apart from the rest
    (:func:`log_of_sum`), so that a confident row's ``log(1 + 1e-24)``
    keeps its ``1e-24``."""
    at_top = shifted == 0
    return log_of_sum(self.sum(jnp.where(at_top, e, 0.0)),
                      self.sum(jnp.where(at_top, 0.0, e)))

  def weights(self, hp: Hyper) -> Hyper:
    """``hp`` with the class weights of the classes held here."""
    return hp

  def scatter(self, d_local):
    """A ``(C,)`` vector of the classes held here as ``(num_classes,)``."""
    return d_local

  def argmax(self, raw):
    """First global index of each row's maximum (0 without classes, as
    for a row whose every logit is ``-inf``)."""
    if raw.shape[-1] == 0:
      return jnp.zeros(raw.shape[:-1], jnp.int32)
    return jnp.argmax(raw, axis=-1)


def weighted(x, hp: Hyper):
  """``x * class_weights`` broadcast over rows, or ``x`` without weights."""
  if hp.class_weights is None:
    return x
  return x * hp.class_weights.reshape((1,) * (x.ndim - 1) + (-1,))


def label_weights(y, hp: Hyper, num_classes: int, dtype):
  """``class_weights[y]`` per row (labels clipped into range: a bad label's
  row is NaN anyway), or ones without class weights."""
  one = jnp.ones(y.shape, dtype)
  if hp.class_weights is None:
    return one
  return one * hp.class_weights.at[jnp.clip(y, 0, num_classes - 1)].get(
      out_sharding=rows_sharding(y))


def take_rows(a, idx):
  """``a[i, idx[i]]`` of a ``(rows, C)`` array, ``idx`` in range. On a
  mesh with Explicit axes ``idx`` takes ``a``'s row sharding (each device
  gathers its own rows), and classes split over devices are picked by a
  masked sum (a ``psum`` of ``(rows,)``, not a gather of indices)."""
  spec = explicit_spec(a)
  if spec is not None:
    idx = jax.reshard(idx, rows_sharding(a))
    if len(spec) > 1 and spec[1] is not None:
      pick = jnp.arange(a.shape[1])[None, :] == idx[:, None]
      if a.dtype == jnp.bool_:
        return jnp.any(pick & a, axis=-1)
      return jnp.sum(jnp.where(pick, a, jnp.zeros((), a.dtype)), axis=-1)
  return jnp.take_along_axis(a, idx[:, None], -1)[:, 0]


def class_sum(values, y, like):
  """``d[c] = sum of values[i] over the rows with y[i] = c``, in the dtype
  and sharding of ``like`` (the ``(C,)`` class weights; ``y`` in range)."""
  d = jnp.zeros(like.shape, values.dtype)
  return sharded_like(d.at[y].add(values, out_sharding=rows_sharding(d)),
                      like).astype(like.dtype)


class RowStats(NamedTuple):
  """Per-row results of the forward pass, all shape ``(rows,)``.

  Attributes:
    lse: log-sum-exp of the capped logits (0 on uncounted rows).
    xent: cross-entropy term of the row's loss (0 on uncounted rows).
    counted: bool, the row enters the loss.
    mean_weight: the row's share of the ``"mean"`` denominator.
    target_mass: total target weight ``a``: ``d xent / d z = a p - t_w``.
    support_size: ``K = |S|`` (label smoothing spreads over it).
    nan_row: bool, a counted row whose loss is NaN by rule (a bad label, or
      NaN or ``+inf`` among its logits).
    bad_label: bool, a counted row whose integer label is out of range.
    shift: the row maximum ``m`` (0 on uncounted rows).
    log_sum: ``log sum_S exp(z - m)``: ``p = exp(z - m - log_sum)``.
    exp: ``(rows, C)`` ``exp(z - m)`` when kept for the backward pass;
      with integer labels, 0 at the label (whose entry is ``exp_label``).
    exp_label: ``(rows,)`` ``exp(z_y - m)`` with a kept exp and integer
      labels, else None.
  """

  lse: jax.Array
  xent: jax.Array
  counted: jax.Array
  mean_weight: jax.Array
  target_mass: jax.Array
  support_size: jax.Array
  nan_row: jax.Array
  shift: jax.Array
  log_sum: jax.Array
  bad_label: jax.Array
  exp: jax.Array | None = None
  exp_label: jax.Array | None = None


def scaled_logits(z, hp: Hyper):
  """``z / temperature`` in the compute dtype (``z`` without one)."""
  zt = z.astype(compute_dtype(z.dtype))
  return zt if hp.temperature is None else div_scalar(zt, hp.temperature)


def support_logits(z, class_mask, hp: Hyper):
  """Scaled, capped logits in the compute dtype, ``-inf`` off the
  support."""
  zc = scaled_logits(z, hp)
  if hp.soft_cap is not None:
    zc = soft_cap(zc, hp.soft_cap)
  if class_mask is not None:
    zc = jnp.where(class_mask, zc, NEG_INF)
  return zc


def smoothed_target(t, valid, k, eps):
  """``(1 - eps) t + eps / K`` on the support (``t`` without smoothing)."""
  t = t.astype(k.dtype)
  if eps is None:
    return t
  return (1 - eps) * t + eps * valid / k[:, None]


def row_stats(z, target, row, class_mask, hp: Hyper, *, int_labels: bool,
              classes: Classes, keep_exp: bool = False) -> RowStats:
  """Forward pass over a ``(rows, C)`` block.

  Args:
    z: ``(rows, C)`` logits, any floating dtype.
    target: ``(rows,)`` integer labels or ``(rows, C)`` probabilities.
    row: ``(rows,)`` bool, False for rows masked out or ``ignore_index``.
    class_mask: ``(rows, C)`` bool class mask, or None.
    hp: hyperparameters.
    int_labels: whether ``target`` holds class indices.
    classes: the class axis (whole, or split over a mesh axis).
    keep_exp: keep ``exp(z - m)`` for the backward pass. XLA writes it out
      for the sum anyway; keeping it saves the backward an ``exp`` per
      entry (but holds a ``(rows, C)`` float32 array until then).
  """
  zc = support_logits(z, class_mask, hp)
  top = classes.max(zc)
  counted = row & (top != NEG_INF)            # NaN rows stay counted
  zc = jnp.where(counted[:, None], zc, 0.0)   # uncounted rows: harmless zeros
  m, shifted, e = shift_exp(zc, jnp.where(counted, top, 0.0)[:, None])
  valid = zc != NEG_INF
  k = classes.sum(valid.astype(zc.dtype))
  # NaN or +inf in a counted row: NaN loss and gradient, the whole row.
  poisoned = counted & (jnp.isnan(top) | (top == jnp.inf))
  terms = (_int_label_terms if int_labels else _target_terms)(
      zc, shifted, e, valid, k, target, counted, hp, classes)
  log_s, xent, mass, weight, bad, kept, e_y = terms
  nan_row = poisoned | bad
  xent = jnp.where(counted, jnp.where(nan_row, jnp.nan, xent), 0.0)
  lse = jnp.where(poisoned, jnp.nan, m[:, 0] + log_s)
  return RowStats(
      lse=jnp.where(counted, lse, 0.0), xent=xent,
      counted=counted, mean_weight=weight, target_mass=mass,
      support_size=k, nan_row=nan_row, shift=m[:, 0],
      log_sum=jnp.where(counted, log_s, 0.0), bad_label=bad,
      exp=kept if keep_exp else None, exp_label=e_y if keep_exp else None)


def _int_label_terms(zc, shifted, e, valid, k, y, counted, hp, classes):
  """``(log_s, xent, target_mass, mean_weight, bad, e without the label's
  entry, e_y)`` for integer labels.

  The sum of ``exp(z - m)`` is ``r_y + e_y``, ``r_y`` over the classes other
  than the label: ``nll_y = log(1 + r_y / e_y)`` keeps a tiny ``r_y`` (a
  confident row: ``[20, 0]`` with label 0 gives 2.06e-9, where
  ``log_s - z_y`` rounds to 0). Where ``e_y`` underflows, ``log_s - z_y``
  (no cancellation there).
  """
  bad = counted & ((y < 0) | (y >= classes.num_classes))
  z_y = classes.take(shifted, y)
  # e's own exp, not a second; the masked e is the one kept (XLA then
  # writes one (rows, C) array, not e and its masked copy).
  e_not_y = jnp.where(classes.is_label(y), 0.0, e)
  r_y = classes.sum(e_not_y)
  e_y = jnp.exp(z_y)
  eps = hp.label_smoothing
  # Smoothing's terms need log_s itself to the last ulp (a confident row's
  # log_s is tiny); without it, log_s gives lse, p and an objective's
  # entropy, exact where the label is at the maximum (expm1(z_y) = 0: the
  # log1p of r_y, no second sum; expm1 keeps d/dz_y for second order) and
  # to log's absolute ulp elsewhere.
  log_s = (jnp.log1p(r_y + jnp.expm1(z_y)) if eps is None
           else classes.log_sum(shifted, e))
  near = z_y > -20.0
  nll_y = jnp.where(near, jnp.log1p(r_y / jnp.where(near, e_y, 1.0)),
                    log_s - z_y)
  w_y = label_weights(y, hp, classes.num_classes, zc.dtype)
  xent = mul0(w_y, jnp.where(bad, jnp.nan, nll_y))
  mass = w_y
  if eps is not None:
    # (eps / K) sum_S w_c nll_c = (W_S log_s - sum_S w_c (z_c - m)) / K
    local = classes.weights(hp)
    w_s = classes.sum(weighted(valid.astype(zc.dtype), local))
    wz = classes.sum(weighted(jnp.where(valid, shifted, 0.0), local))
    xent = mul0(1 - eps, xent) + eps * (w_s * log_s - wz) / k
    mass = (1 - eps) * w_y + eps * w_s / k
  return log_s, xent, mass, jnp.where(counted, w_y, 0.0), bad, e_not_y, e_y


def _target_terms(zc, shifted, e, valid, k, target, counted, hp, classes):
  """``(log_s, xent, target_mass, mean_weight, bad, e, None)`` for
  probabilities."""
  log_s = classes.log_sum(shifted, e)
  q = smoothed_target(clean_rows(target, counted), valid, k,
                      hp.label_smoothing)
  wq = weighted(q, hp)
  xent = jnp.sum(mul0(wq, log_s[:, None] - shifted), axis=-1)
  return (log_s, xent, jnp.sum(wq, axis=-1), counted.astype(zc.dtype),
          jnp.zeros_like(counted), e, None)


def stats_exp(z, class_mask, hp: Hyper, st: RowStats, labels=None, *,
              classes: Classes | None = None):
  """``(zc, zc - m, exp(zc - m))`` of a block from its row stats: the
  capped logits (0 on uncounted rows), shifted by the row's ``m``
  (``-inf`` off the support), and their exp: the kept one when
  ``st.exp`` is set (no second exp; with integer labels, given as
  ``labels`` with their ``classes``, the label's entry put back)."""
  zc = support_logits(z, class_mask, hp)
  zc = jnp.where(st.counted[:, None], zc, 0.0)
  shifted = zc - st.shift[:, None]
  e = st.exp
  if e is None:
    e = jnp.exp(shifted)
  elif st.exp_label is not None:
    if labels is None or classes is None:
      raise ValueError("stats_exp: a kept exp of integer labels needs the "
                       "labels and their classes")
    e = jnp.where(classes.is_label(labels), st.exp_label[:, None], e)
  return zc, shifted, e


def probs(z, class_mask, hp: Hyper, st: RowStats, labels=None, *,
          classes: Classes | None = None):
  """Capped logits, ``p`` and ``-log p``, from the row stats.

  ``p = exp(z - m) / s`` with the kept exp, else ``exp((z - m) - log_s)``;
  never ``exp(z - lse)``: ``lse`` rounded to float32 would shift every
  exponent by up to ``|lse| * 2**-24``. Unused parts (``zc`` without a
  cap or smoothing) cost nothing under ``jit``.
  """
  zc, shifted, e = stats_exp(z, class_mask, hp, st, labels, classes=classes)
  nll = st.log_sum[:, None] - shifted
  p = jnp.exp(-nll) if st.exp is None else e * jnp.exp(-st.log_sum)[:, None]
  return zc, p, nll


class RowCotangents(NamedTuple):
  """Per-row cotangents of a reduced loss, ``(rows,)`` (0 if uncounted).

  Attributes:
    xent: of the cross-entropy terms (the reduction's scale and the
      per-row ``weights`` included).
    z_loss: of the z-loss terms.
    mean_xent: the cross-entropy mean where the class weights enter the
      denominator (``"mean"`` with integer labels), else 0: a scalar.
    scale: the reduction's scale alone (``xent`` without ``weights``): the
      cotangent of a row's weight is ``scale * RowStats.xent``.
  """

  xent: jax.Array
  z_loss: jax.Array
  mean_xent: jax.Array
  scale: jax.Array


def grad_capped(zc, p, target, hp: Hyper, int_labels: bool, st: RowStats,
                 cot: RowCotangents, classes: Classes):
  """The cross-entropy's ``d loss / d zc`` with respect to the capped
  logits ``zc`` (which may be None when there is no smoothing: only the
  support needs it). The z-loss's share is :func:`z_loss_grad`."""
  eps = hp.label_smoothing
  if int_labels:
    onehot = classes.is_label(target)
    ones = weighted(jnp.ones_like(p), classes.weights(hp))
    target_w = jnp.where(onehot, ones, 0.0)
    if eps is not None:
      support = jnp.where(zc != NEG_INF, ones, 0.0)
      target_w = (1 - eps) * target_w + eps * support / st.support_size[
          :, None]
  else:
    valid = None if eps is None else zc != NEG_INF
    target_w = weighted(smoothed_target(target, valid, st.support_size, eps),
                        hp)
  # c (a p - t_w), factored so that an infinite cotangent (a "mean" over
  # zero class weights) gives +-inf, not inf - inf.
  return cot.xent[:, None] * (st.target_mass[:, None] * p - target_w)


def z_loss_coef(hp: Hyper, cot: RowCotangents):
  """Per row, ``d loss / d lse`` of the z-loss over ``lse``: ``2 zl`` times
  the cotangent (``zl lse^2`` has slope ``2 zl lse``)."""
  assert hp.z_loss is not None
  return cot.z_loss * (2 * hp.z_loss)


def z_loss_grad(p, hp: Hyper, st: RowStats, cot: RowCotangents, to=None):
  """The z-loss's ``2 zl lse p`` (times the cotangent), with ``lse p``
  formed first and carried through ``to`` (the cap's and temperature's
  factors, :func:`to_logits`) before the coefficient: near the float
  maximum ``2 lse`` overflows where the result does not (``inf * (p =
  0)`` was NaN, and a cap's factor of 0.42 came after an ``inf``)."""
  lse_p = st.lse[:, None] * p
  if to is not None:
    lse_p = to(lse_p)
  return z_loss_coef(hp, cot)[..., None] * lse_p


def grad_logits(z, target, class_mask, hp: Hyper, st: RowStats,
                cot: RowCotangents, *, int_labels: bool, classes: Classes):
  """``d loss / d z`` for a block, in the compute dtype.

  Exactly 0 on uncounted rows and masked classes, NaN on ``nan_row`` rows.
  """
  zc, p, _ = probs(z, class_mask, hp, st, target if int_labels else None,
                  classes=classes)
  g = to_logits(grad_capped(zc, p, target, hp, int_labels, st, cot,
                             classes), zc, hp)
  if hp.z_loss is not None:
    g = g + z_loss_grad(p, hp, st, cot, to=lambda a: to_logits(a, zc, hp))
  keep = st.counted[:, None]
  if class_mask is not None:
    keep = keep & class_mask
  # NaN rows: NaN on their classes (masked ones keep 0); a bad label's row:
  # NaN on all.
  g = jnp.where(keep, jnp.where(st.nan_row[:, None], jnp.nan, g), 0.0)
  return jnp.where(st.bad_label[:, None], jnp.nan, g)


def to_logits(g, zc, hp: Hyper):
  """A gradient with respect to the capped logits ``zc`` carried back to
  the logits: times the cap's ``1 - (zc / cap)**2`` (0 off the support)
  and ``1 / temperature``. ``zc`` may be None without a cap."""
  if hp.soft_cap is not None:
    assert zc is not None
    g = g * jnp.where(zc != NEG_INF,
                      1 - jnp.square(div_scalar(zc, hp.soft_cap)), 0.0)
  return g if hp.temperature is None else div_scalar(g, hp.temperature)


def grad_target(z, class_mask, hp: Hyper, st: RowStats, cot: RowCotangents):
  """``d loss / d t`` for probability targets: ``(1-eps) w_c nll_c`` on the
  support, 0 off it and on uncounted rows, NaN on ``nan_row`` rows."""
  zc, _, nll = probs(z, class_mask, hp, st)
  scale = 1.0 if hp.label_smoothing is None else 1 - hp.label_smoothing
  dt = cot.xent[:, None] * scale * weighted(nll, hp)
  keep = st.counted[:, None]
  if class_mask is not None:
    keep = keep & class_mask
  dt = jnp.where(st.nan_row[:, None], jnp.nan, dt)
  return jnp.where(keep & ((zc != NEG_INF) | st.nan_row[:, None]), dt, 0.0)
