"""Float64 NumPy reference for the softmax family and the losses.

Written from the formulas of the core issue (sections 3 and 4) and the
docstrings, independently of the library (no jax here). Every function takes
array-likes, computes in float64 and returns float64 NumPy arrays.

Conventions shared with the library (the special-values table):

* The support of a slice/row is the set of entries that are not masked and
  whose (capped) logit is not ``-inf``. ``K`` is its size.
* Primitives: an empty support gives softmax 0, log_softmax and logsumexp
  ``-inf`` and zero gradients; NaN or ``+inf`` among the unmasked entries
  makes the whole slice NaN, values and gradients (logsumexp: ``+inf`` for a
  ``+inf`` slice without NaN, NaN gradient).
* Losses: a row is counted when its row mask is True, its label is not
  ``ignore_index`` (integer labels) and its support is not empty. Uncounted
  rows give loss 0 and gradient exactly 0. A counted row holding NaN or
  ``+inf`` among its unmasked logits gives NaN loss and NaN gradient on its
  unmasked classes (masked classes keep gradient 0). A counted row whose
  integer label is outside ``[0, C)`` is NaN everywhere. Target mass on a
  class off the support gives ``+inf`` with a finite gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Axis = int | Sequence[int] | None


def normalize_axes(axis: Axis, ndim: int) -> tuple[int, ...]:
  if axis is None:
    return tuple(range(ndim))
  axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
  return tuple(sorted(int(a) % ndim for a in axes))


def _f64(x) -> np.ndarray:
  return np.asarray(np.asarray(x).astype(np.float64))


def matmul(a, b) -> np.ndarray:
  """``a @ b`` in float64 with IEEE semantics whatever the BLAS kernel.

  With a non-finite entry the product is summed by NumPy's own loops: a
  vectorised BLAS kernel multiplies an infinity by its padding lanes' zeros
  and raises the invalid flag (NumPy 2 turns it into a warning) on some
  CPUs and not on others.
  """
  a, b = _f64(a), _f64(b)
  if np.isfinite(a).all() and np.isfinite(b).all():
    return a @ b
  with np.errstate(invalid="ignore", over="ignore"):
    return np.einsum("...k,kn->...n", a, b)


def _mask(where, shape) -> np.ndarray:
  if where is None:
    return np.ones(shape, bool)
  return np.broadcast_to(np.asarray(where, bool), shape)


# --------------------------------------------------------------------------
# primitives
#
# ``b`` (logsumexp's scale factors) joins the mask: an entry is summed when
# ``where`` holds and ``b != 0`` (``jax.nn``), and is in the support when its
# ``x`` is not ``-inf`` either. Without ``b``, ``b = 1``.


def _slice_stats(x, axes, where, b=None):
  """Returns support, poisoned slices (NaN/+inf), shift m, ``u = exp(x - m)``
  on the mask, the summands ``e = b u`` on the support and their sum s."""
  mask = _mask(where, x.shape)
  bb = np.ones(x.shape) if b is None else np.broadcast_to(_f64(b), x.shape)
  with np.errstate(all="ignore"):
    summed = mask & (bb != 0)
    poison = np.any(summed & (np.isnan(x) | (x == np.inf) | ~np.isfinite(bb)),
                    axis=axes, keepdims=True)
    sup = summed & (x > -np.inf)  # NaN > -inf is False
    m = np.max(np.where(sup, x, -np.inf), axis=axes, keepdims=True,
               initial=-np.inf)
    m = np.where(np.isfinite(m), m, 0.0)
    u = np.where(mask & (x > -np.inf), np.exp(x - m), 0.0)
    u = np.where(mask & np.isnan(x), np.nan, u)
    e = np.where(sup, bb * u, 0.0)
    s = np.sum(e, axis=axes, keepdims=True)
  return sup, poison, m, u, e, s


def _ratio(v, s, nan):
  """``v / s``: 0 where ``s == 0``, NaN where ``nan`` (per slice)."""
  with np.errstate(all="ignore"):
    r = np.where(s != 0, v / np.where(s != 0, s, 1.0), 0.0)
  return np.where(nan, np.nan, r)


def softmax(x, axis: Axis = -1, where=None) -> np.ndarray:
  x = _f64(x)
  axes = normalize_axes(axis, x.ndim)
  _, poison, _, _, e, s = _slice_stats(x, axes, where)
  return _ratio(e, s, poison)


def softmax_vjp(x, g, axis: Axis = -1, where=None) -> np.ndarray:
  """``d <g, softmax(x)> / dx = y * (g - sum(g * y))``."""
  x, g = _f64(x), _f64(g)
  axes = normalize_axes(axis, x.ndim)
  y = softmax(x, axis, where)
  return y * (g - np.sum(g * y, axis=axes, keepdims=True))


def log_softmax(x, axis: Axis = -1, where=None) -> np.ndarray:
  x = _f64(x)
  axes = normalize_axes(axis, x.ndim)
  sup, poison, m, _, _, s = _slice_stats(x, axes, where)
  with np.errstate(all="ignore"):
    out = np.where(sup, x - m - np.log(s), -np.inf)
  return np.where(poison, np.nan, out)


def log_softmax_vjp(x, g, axis: Axis = -1, where=None) -> np.ndarray:
  """``g - softmax * sum(g)`` with the sum over the support, 0 off it."""
  x, g = _f64(x), _f64(g)
  axes = normalize_axes(axis, x.ndim)
  sup, poison, _, _, _, _ = _slice_stats(x, axes, where)
  y = softmax(x, axis, where)
  gs = np.where(sup, g, 0.0)
  dx = np.where(sup, gs - y * np.sum(gs, axis=axes, keepdims=True), 0.0)
  return np.where(poison, np.nan, dx)


def _squeeze(v, axes, keepdims):
  return v if keepdims else np.squeeze(v, axis=axes)


def _broadcast_b(x, b):
  """``x`` and ``b`` broadcast together (``b`` may be None)."""
  if b is None:
    return x, None
  shape = np.broadcast_shapes(x.shape, np.shape(b))
  return np.broadcast_to(x, shape), np.broadcast_to(_f64(b), shape)


def logsumexp(x, axis: Axis = None, keepdims: bool = False, where=None, *,
              b=None, return_sign: bool = False):
  """``m + log|s|`` (``(lse, sign)`` with ``return_sign``); without
  ``return_sign`` a negative ``s`` gives NaN. NaN in the support gives NaN,
  ``+-inf`` terms give ``+inf`` (sign of the infinite terms)."""
  x, b = _broadcast_b(_f64(x), b)
  axes = normalize_axes(axis, x.ndim)
  mask = _mask(where, x.shape)
  summed = mask if b is None else mask & (b != 0)
  _, _, m, _, _, s = _slice_stats(x, axes, where, b)
  with np.errstate(all="ignore"):
    has_nan = np.any(summed & np.isnan(x), axis=axes, keepdims=True)
    s = np.where(has_nan, np.nan, s)
    lse = m + np.log(np.abs(s) if return_sign else s)
    sign = np.sign(s)
  if return_sign:
    return _squeeze(lse, axes, keepdims), _squeeze(sign, axes, keepdims)
  return _squeeze(lse, axes, keepdims)


def _logsumexp_grads(x, g, axis, keepdims, where, b, return_sign):
  """``(d/dx, d/db)`` of ``<g, lse>``: ``g b u / s`` and ``g u / s``.

  Zero for an empty support; NaN for a poisoned slice, for a sum that
  cancels to exactly 0 on a non-empty support, and (without
  ``return_sign``) for a negative sum.
  """
  x, b = _broadcast_b(_f64(x), b)
  g = _f64(g)
  axes = normalize_axes(axis, x.ndim)
  if not keepdims:
    g = np.expand_dims(g, axes)
  sup, poison, _, u, e, s = _slice_stats(x, axes, where, b)
  nonempty = np.any(sup, axis=axes, keepdims=True)
  nan = poison | ((s == 0) & nonempty)
  if not return_sign:
    nan = nan | (s < 0)
  with np.errstate(all="ignore"):
    return g * _ratio(e, s, nan), g * _ratio(u, s, nan)


def logsumexp_vjp(x, g, axis: Axis = None, keepdims: bool = False,
                  where=None, *, b=None, return_sign=False) -> np.ndarray:
  """``g * softmax(x)`` without ``b`` (NaN on poisoned slices)."""
  return _logsumexp_grads(x, g, axis, keepdims, where, b, return_sign)[0]


def logsumexp_vjp_b(x, g, axis: Axis = None, keepdims: bool = False,
                    where=None, *, b, return_sign=False) -> np.ndarray:
  """``d <g, lse> / db = g exp(x - m) / s`` where ``where`` holds, ``b = 0``
  included (the true derivative), of the broadcast shape."""
  return _logsumexp_grads(x, g, axis, keepdims, where, b, return_sign)[1]


def hessian(name, x, c, where=None) -> np.ndarray:
  """The Hessian of ``<c, f(x)>`` for a 2-D ``x`` normalised over its last
  axis, shape ``x.shape * 2`` (log_softmax: ``c`` counts on the support
  only, the objective being ``sum(where(support, c * out, 0))``).

  With ``y = softmax(x)`` per row and ``J = diag(y) - y y^T``:
  logsumexp ``c J``; log_softmax ``-(sum c) J``; softmax
  ``H_ik = J_ik (c_i - <c, y>) - y_i y_k (c_k - <c, y>)``.
  """
  x, c = _f64(x), _f64(c)
  n, k = x.shape
  y = softmax(x, -1, where)
  sup = _mask(where, x.shape) & (x > -np.inf)
  h = np.zeros((n, k, n, k))
  for r in range(n):
    jac = np.diag(y[r]) - np.outer(y[r], y[r])
    if name == "logsumexp":
      h[r, :, r, :] = c[r] * jac
    elif name == "log_softmax":
      h[r, :, r, :] = -np.sum(np.where(sup[r], c[r], 0.0)) * jac
    else:
      d = c[r] - np.dot(c[r], y[r])
      h[r, :, r, :] = jac * d[:, None] - np.outer(y[r], y[r] * d)
  return h


# --------------------------------------------------------------------------
# losses: layout


def class_axes(axis: Axis, ndim: int) -> tuple[int, ...]:
  """The class axes in the order given: optax flattens a tuple ``axis`` in
  that order (a label is a flat index into ``logits[axis]``)."""
  if axis is None:
    return tuple(range(ndim))
  axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
  return tuple(int(a) % ndim for a in axes)


def to_rows(x, axis: Axis):
  """Moves the class axes last and flattens: ``(rows, classes)``.

  Returns ``(rows_array, batch_shape, perm)``.
  """
  x = np.asarray(x)
  axes = class_axes(axis, x.ndim)
  batch = tuple(a for a in range(x.ndim) if a not in axes)
  perm = batch + axes
  batch_shape = tuple(x.shape[a] for a in batch)
  c = int(np.prod([x.shape[a] for a in axes]))
  return np.transpose(x, perm).reshape(-1, c), batch_shape, perm


def from_rows(r, shape, perm) -> np.ndarray:
  """Inverse of :func:`to_rows` for a ``(rows, classes)`` array."""
  permuted = tuple(shape[p] for p in perm)
  return np.transpose(r.reshape(permuted), np.argsort(perm))


def _layout(logits, labels, axis, where, ignore_index):
  z = _f64(logits)
  axes = class_axes(axis, z.ndim)
  zr, batch_shape, perm = to_rows(z, axes)
  n, _ = zr.shape
  labels = np.asarray(labels)
  is_int = np.issubdtype(labels.dtype, np.integer)
  cm = np.ones(zr.shape, bool)
  row = np.ones((n,), bool)
  if where is not None:
    w = np.asarray(where, bool)
    if w.ndim == z.ndim:
      cm = to_rows(np.broadcast_to(w, z.shape), axes)[0]
    else:
      row = np.broadcast_to(w, batch_shape).reshape(-1).copy()
  if is_int:
    target = labels.reshape(-1).astype(np.int64)
    if ignore_index is not None:
      row &= target != ignore_index
  else:
    target = to_rows(_f64(labels), axes)[0]
  return zr, target, row, cm, batch_shape, perm, is_int


def _log_sum(e, shifted):
  """``log sum e`` along the last axis as ``log1p`` of the terms below the
  maximum (``shifted == 0`` there): exact for rows whose other terms are
  tiny, where ``log(1 + r)`` rounds ``r`` away even in float64."""
  top = shifted == 0
  rest = np.sum(np.where(top, 0.0, e), axis=-1)
  return np.log1p(rest + (np.sum(top, axis=-1) - 1))


def _mul0(a, b):
  """``a * b`` where a zero coefficient drops its term (``0 * inf = 0``),
  as the formulas read; NaN rows are set to NaN separately."""
  with np.errstate(all="ignore"):
    return np.where(a == 0, 0.0, a * b)


class _Rows:
  """Per-row forward quantities and the local gradients of one row."""


def _forward(zr, target, row, cm, is_int, eps, w, zl, cap) -> _Rows:
  n, c = zr.shape
  r = _Rows()
  eps = float(eps)
  w = np.ones(c) if w is None else _f64(w)
  with np.errstate(all="ignore"):
    if cap is not None:
      cap = float(cap)
      zc = np.where(zr == -np.inf, -np.inf, cap * np.tanh(zr / cap))
      # d zc / d z; 0 at -inf (the limit of 1 - tanh^2).
      dcap = np.where(zr == -np.inf, 0.0, 1 - np.tanh(zr / cap) ** 2)
    else:
      zc, dcap = zr, np.ones_like(zr)
    zc = np.where(cm, zc, -np.inf)
    poison = np.any(np.isnan(zc) | (zc == np.inf), axis=-1)
    sup = zc > -np.inf
    nonempty = np.any(zc != -np.inf, axis=-1)   # NaN counts as a class
    counted = row & nonempty
    k = np.sum(sup, axis=-1).astype(np.float64)
    zs = np.where(sup, zc, -np.inf)
    m = np.max(zs, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    shifted = zs - m
    log_s = _log_sum(np.where(sup, np.exp(shifted), 0.0), shifted)
    lse = m[:, 0] + log_s
    # -log p_c, stable: log sum exp(z - m) - (z_c - m); +inf off support.
    nll = np.where(sup, log_s[:, None] - shifted, np.inf)
    p = np.where(sup, np.exp(-nll), 0.0)
    kk = np.where(k > 0, k, 1.0)[:, None]
    if is_int:
      y = target
      bad = counted & ((y < 0) | (y >= c))
      yc = np.clip(y, 0, c - 1)
      onehot = np.arange(c)[None, :] == yc[:, None]
      w_y = w[yc]
      nll_y = nll[np.arange(n), yc]
      ce = _mul0((1 - eps) * w_y, nll_y)
      tw = (1 - eps) * w_y[:, None] * onehot
      if eps:
        wn = np.where(sup, w[None, :] * nll, 0.0)
        ce = ce + eps * np.sum(wn, axis=-1) / kk[:, 0]
        tw = tw + eps * np.where(sup, w[None, :], 0.0) / kk
      weight = w_y
      dt = None
    else:
      bad = np.zeros((n,), bool)
      q = (1 - eps) * target + eps * sup / kk
      wq = w[None, :] * q
      ce = np.sum(_mul0(wq, nll), axis=-1)
      tw = wq
      weight = np.ones((n,))
      dt = np.where(sup, (1 - eps) * w[None, :] * nll, 0.0)
    a = np.sum(tw, axis=-1)
    d_ce = (a[:, None] * p - tw) * dcap
    d_z = 2 * zl * lse[:, None] * p * dcap
    nan_row = counted & (poison | bad)
    ce = np.where(nan_row, np.nan, ce)
    lse = np.where(poison & counted, np.nan, lse)
  r.counted, r.ce, r.lse, r.weight = counted, ce, lse, weight
  r.d_ce, r.d_z, r.dt, r.cm = d_ce, d_z, dt, cm
  r.nan_row, r.bad, r.zl = nan_row, bad, float(zl)
  return r


def _reduce(r: _Rows, reduction: str):
  ce = np.where(r.counted, r.ce, 0.0)
  zr = np.where(r.counted, r.lse ** 2, 0.0) if r.zl else np.zeros_like(ce)
  if reduction == "none":
    return ce + r.zl * zr
  if reduction == "sum":
    return np.sum(ce) + r.zl * np.sum(zr)
  d = np.sum(np.where(r.counted, r.weight, 0.0))
  n = np.sum(r.counted)
  with np.errstate(all="ignore"):  # weights summing to 0: NaN, as PyTorch
    return (np.sum(ce) / (d if n else 1.0)
            + r.zl * np.sum(zr) / (n if n else 1.0))


def _row_cotangents(r: _Rows, reduction: str, g):
  g = _f64(g)
  if reduction == "mean":
    d = np.sum(np.where(r.counted, r.weight, 0.0))
    n = np.sum(r.counted)
    with np.errstate(all="ignore"):
      c_ce = np.full(r.ce.shape, g / (d if n else 1.0))
    c_z = np.full(r.ce.shape, g / (n if n else 1.0))
  elif reduction == "sum":
    c_ce = c_z = np.full(r.ce.shape, g)
  else:
    c_ce = c_z = g.reshape(-1)
  return np.where(r.counted, c_ce, 0.0), np.where(r.counted, c_z, 0.0)


# --------------------------------------------------------------------------
# losses: public


def cross_entropy(logits, labels, *, axis: Axis = -1, where=None,
                  ignore_index=-100, label_smoothing=0.0, class_weights=None,
                  z_loss=0.0, soft_cap=None, reduction="mean") -> np.ndarray:
  """The issue's cross-entropy (PyTorch's, smoothing over the support)."""
  zr, t, row, cm, batch_shape, _, is_int = _layout(
      logits, labels, axis, where, ignore_index)
  r = _forward(zr, t, row, cm, is_int, label_smoothing, class_weights,
               z_loss, soft_cap)
  out = _reduce(r, reduction)
  return out.reshape(batch_shape) if reduction == "none" else np.asarray(out)


def cross_entropy_vjp(logits, labels, g=1.0, *, axis: Axis = -1, where=None,
                      ignore_index=-100, label_smoothing=0.0,
                      class_weights=None, z_loss=0.0, soft_cap=None,
                      reduction="mean"):
  """Analytic ``(d_logits, d_labels)`` of ``<g, cross_entropy(...)>``.

  ``d_labels`` is None for integer labels. Per row, with cotangents
  ``c_ce`` (cross-entropy) and ``c_z`` (z-loss) from the reduction:
  ``d z = (c_ce (a p - t_w) + c_z 2 z_loss lse p) * cap'`` where ``t_w`` is
  the weighted (smoothed) target distribution and ``a = sum t_w``; ``d t =
  c_ce (1 - eps) w_c (-log p_c)`` on the support.
  """
  z = _f64(logits)
  zr, t, row, cm, _, perm, is_int = _layout(
      logits, labels, axis, where, ignore_index)
  r = _forward(zr, t, row, cm, is_int, label_smoothing, class_weights,
               z_loss, soft_cap)
  c_ce, c_z = _row_cotangents(r, reduction, g)
  with np.errstate(all="ignore"):
    dz = c_ce[:, None] * r.d_ce + c_z[:, None] * r.d_z
    keep = r.counted[:, None] & cm
    dz = np.where(keep, dz, 0.0)
    dz = np.where(r.nan_row[:, None] & cm, np.nan, dz)
    dz = np.where(r.bad[:, None], np.nan, dz)
    dt = None
    if not is_int:
      dt = np.where(r.counted[:, None] & cm, c_ce[:, None] * r.dt, 0.0)
      dt = np.where(r.nan_row[:, None] & cm, np.nan, dt)
      dt = from_rows(dt, z.shape, perm)
  return from_rows(dz, z.shape, perm), dt


def nll_loss(log_probs, labels, *, axis: Axis = -1, where=None,
             ignore_index=-100, class_weights=None,
             reduction="mean") -> np.ndarray:
  """``-w_y log p_y`` per counted row; ``mean`` divides by ``sum w_y``.

  A row counts unless it is masked, ignored, or all its classes are masked.
  A masked target class reads as ``-inf`` (loss ``+inf``).
  """
  return _nll(log_probs, labels, 1.0, axis, where, ignore_index,
              class_weights, reduction)[0]


def nll_loss_vjp(log_probs, labels, g=1.0, *, axis: Axis = -1, where=None,
                 ignore_index=-100, class_weights=None,
                 reduction="mean") -> np.ndarray:
  """``-c w_y`` at the (unmasked) label, 0 elsewhere; NaN rows NaN."""
  return _nll(log_probs, labels, g, axis, where, ignore_index,
              class_weights, reduction)[1]


def _nll(log_probs, labels, g, axis, where, ignore_index, class_weights,
         reduction):
  lp = _f64(log_probs)
  lr, y, row, cm, batch_shape, perm, _ = _layout(
      lp, labels, axis, where, ignore_index)
  n, c = lr.shape
  w = np.ones(c) if class_weights is None else _f64(class_weights)
  counted = row & np.any(cm, axis=-1)
  bad = counted & ((y < 0) | (y >= c))
  yc = np.clip(y, 0, c - 1)
  w_y = w[yc]
  with np.errstate(all="ignore"):
    lp_y = np.where(cm[np.arange(n), yc], lr[np.arange(n), yc], -np.inf)
    ce = np.where(bad, np.nan, _mul0(w_y, -lp_y))
    ce = np.where(counted, ce, 0.0)
    r = _Rows()
    r.counted, r.ce, r.weight, r.zl = counted, ce, w_y, 0.0
    r.lse = np.zeros_like(ce)
    out = _reduce(r, reduction)
    c_ce, _ = _row_cotangents(r, reduction, g)
    onehot = (np.arange(c)[None, :] == y[:, None]) & cm
    d = np.where(onehot, -(c_ce * w_y)[:, None], 0.0)
    d = np.where((counted & np.isnan(ce))[:, None], np.nan, d)
  if reduction == "none":
    out = out.reshape(batch_shape)
  return np.asarray(out), from_rows(d, lp.shape, perm)


def softmax_cross_entropy_with_integer_labels(logits, labels, axis=-1,
                                              where=None) -> np.ndarray:
  """optax's reading: ``lse`` over the unmasked classes minus the raw
  target logit (finite for a masked target); rows with no class left 0."""
  zr, y, row, cm, batch_shape, _, _ = _layout(logits, labels, axis, where,
                                              None)
  n, c = zr.shape
  with np.errstate(all="ignore"):
    zs = np.where(cm, zr, -np.inf)
    m = np.max(zs, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    lse = m[:, 0] + np.log(np.sum(np.exp(zs - m), axis=-1))
    yc = np.clip(y, 0, c - 1)
    out = lse - zr[np.arange(n), yc]
    out = np.where((y < 0) | (y >= c), np.nan, out)
    out = np.where(row & np.any(cm, axis=-1), out, 0.0)
  return out.reshape(batch_shape)


def softmax_cross_entropy(logits, labels, axis=-1, where=None) -> np.ndarray:
  """optax's reading: masked classes are left out of the sum."""
  z = _f64(logits)
  t = np.broadcast_to(_f64(labels), z.shape)
  if where is not None and np.ndim(where) == z.ndim:
    t = np.where(np.broadcast_to(where, z.shape), t, 0.0)
  return cross_entropy(z, t, axis=axis, where=where, reduction="none")


# --------------------------------------------------------------------------
# the fused linear cross-entropy: the logits formed here, the loss above


def _linear_logits(x, w, bias, w_layout):
  """``(x, w as (d, V), x @ w + bias)`` in float64."""
  if w_layout not in ("dv", "vd"):
    raise ValueError(f"w_layout must be 'dv' or 'vd', got {w_layout!r}")
  x, w = _f64(x), _f64(w)
  w = w if w_layout == "dv" else w.T
  z = matmul(x, w)
  if bias is not None:
    z = z + _f64(bias)
  return x, w, z


def linear_cross_entropy(x, w, labels, *, bias=None, w_layout="dv",
                         **cross_entropy_options) -> np.ndarray:
  """:func:`cross_entropy` of the logits ``x @ w + bias``, formed in float64.

  ``x`` is ``(..., d)``, ``w`` is ``(d, V)`` (``(V, d)`` with ``w_layout=
  "vd"``), ``bias`` ``(V,)``; the classes are the last axis of the logits.
  """
  _, _, z = _linear_logits(x, w, bias, w_layout)
  return cross_entropy(z, labels, **cross_entropy_options)


def linear_cross_entropy_vjp(x, w, labels, g=1.0, *, bias=None,
                             w_layout="dv", **cross_entropy_options):
  """``(d_x, d_w, d_bias)`` of ``<g, linear_cross_entropy(...)>``.

  With ``G`` the logits' gradient of :func:`cross_entropy_vjp` (rows
  flattened to ``(n, V)``): ``d_x = G w^T``, ``d_w = x^T G`` (its transpose
  for ``w_layout="vd"``) and ``d_bias`` the sum of ``G`` over the rows
  (None without a bias).
  """
  x, wdv, z = _linear_logits(x, w, bias, w_layout)
  dz, _ = cross_entropy_vjp(z, labels, g, **cross_entropy_options)
  d, v = wdv.shape
  xr, dzr = x.reshape(-1, d), dz.reshape(-1, v)
  dx = matmul(dzr, wdv.T).reshape(x.shape)
  dw = matmul(xr.T, dzr)
  dw = dw if w_layout == "dv" else dw.T
  db = None if bias is None else np.sum(dzr, axis=0)
  return dx, dw, db
