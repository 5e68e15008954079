"""softmax, log_softmax and logsumexp with hand-written gradients.

All three share one stable reduction, :func:`_shifted_exp_sum`: subtract the
per-slice maximum, exponentiate, sum. They compute in float32 (or float64) for
low-precision inputs and return the input's dtype, like ``jax.nn``.

Conventions (tested):

* A masked entry (``where`` False) and a ``-inf`` entry are outside the
  support: softmax gives 0 there, log_softmax ``-inf``, and the gradient with
  respect to them is exactly 0.
* A slice with nothing in its support gives softmax 0, log_softmax and
  logsumexp ``-inf``, and zero gradients (``jax.nn`` gives NaN).
* NaN anywhere in a slice, or ``+inf``, makes that slice NaN (logsumexp of a
  ``+inf`` slice is ``+inf``), values and gradients.

These are ``jax.custom_vjp`` functions: reverse mode (``grad``, ``vjp``,
``jacrev``, and grad-of-grad for Hessian-vector products) works; forward mode
(``jvp``, ``jacfwd``, ``jax.hessian``) does not.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_softmax import _checks

_NEG_INF = -jnp.inf


def compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
  """float32 for half-precision inputs, else the input's dtype."""
  return jnp.result_type(dtype, jnp.float32)


def _shifted_exp_sum(x: jax.Array, axes: tuple[int, ...],
                     mask: jax.Array | None
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Returns ``(e, s, m)``: ``e = exp(x - m)`` (0 off the support), its sum
  ``s`` over ``axes`` (kept dims) and the shift ``m``.

  ``m`` is the slice maximum, or 0 when the slice has no finite maximum (all
  masked or ``-inf``: then ``s = 0``; ``+inf``/NaN: then ``s`` is inf/NaN).
  """
  x = x.astype(compute_dtype(x.dtype))
  if mask is not None:
    x = jnp.where(mask, x, _NEG_INF)
  m = jnp.max(x, axis=axes, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.exp(x - m)
  return e, jnp.sum(e, axis=axes, keepdims=True), m


def _normalize(e, s):
  """``e / s``: 0 where the support is empty (``s == 0``), NaN for the whole
  slice where it holds ``+inf`` (``s == inf``) or NaN; no NaN intermediate
  otherwise (``jax.debug_nans`` stays quiet)."""
  ok = jnp.isfinite(s) & (s > 0)
  p = e / jnp.where(ok, s, 1.0)
  return jnp.where(ok, p, jnp.where(s == 0, 0.0, jnp.nan))


def _prepare(x, axis, where, axis_default_all: bool = False):
  x = _checks.as_float_array(x, "x")
  axes = _checks.normalize_axes(
      None if (axis is None and axis_default_all) else axis, x.ndim)
  mask = None
  if where is not None:
    mask = _checks.broadcast_mask(_checks.as_bool_mask(where), x.shape, "x")
  return x, axes, mask


# --------------------------------------------------------------------------
# softmax


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _softmax(x, axes, mask):
  return _softmax_fwd(x, axes, mask)[0]


def _softmax_fwd(x, axes, mask):
  e, s, _ = _shifted_exp_sum(x, axes, mask)
  y = _normalize(e, s).astype(x.dtype)
  return y, y


def _softmax_bwd(axes, y, g):
  # d softmax: y * (g - <g, y>); zero wherever y == 0 (off the support).
  yc = y.astype(compute_dtype(y.dtype))
  gc = g.astype(yc.dtype)
  dx = yc * (gc - jnp.sum(gc * yc, axis=axes, keepdims=True))
  return dx.astype(y.dtype), None


_softmax.defvjp(_softmax_fwd, _softmax_bwd)


def softmax(x: jax.typing.ArrayLike, axis: int | tuple[int, ...] = -1,
            where: jax.typing.ArrayLike | None = None) -> jax.Array:
  r"""Softmax over ``axis``, stable, with a hand-written gradient.

  .. math::
    \mathrm{softmax}(x)_i = \frac{\exp(x_i - m)}{\sum_j \exp(x_j - m)},
    \qquad m = \max_j x_j

  with the sum over the support (``where`` True and ``x > -inf``).

  Args:
    x: floating array of any shape.
    axis: int or tuple of ints: the axes that sum to 1.
    where: optional boolean mask broadcastable to ``x.shape``; masked entries
      get probability 0 and gradient 0.

  Returns:
    An array of ``x``'s shape and dtype. A slice with an empty support gives
    zeros (``jax.nn.softmax`` gives NaN). NaN or ``+inf`` in a slice gives NaN
    for that slice. The gradient keeps only the output as residual:
    ``dx = y * (g - sum(g * y))``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jax_softmax import softmax
    >>> softmax(jnp.array([1000.0, 1000.0, -jnp.inf]))
    Array([0.5, 0.5, 0. ], dtype=float32)
  """
  x, axes, mask = _prepare(x, axis, where)
  return _softmax(x, axes, mask)


# --------------------------------------------------------------------------
# log_softmax


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _log_softmax(x, axes, mask):
  return _log_softmax_fwd(x, axes, mask)[0]


def _log_softmax_fwd(x, axes, mask):
  xc = x.astype(compute_dtype(x.dtype))
  if mask is not None:
    xc = jnp.where(mask, xc, _NEG_INF)
  _, s, m = _shifted_exp_sum(xc, axes, None)
  # s == 0: empty support, every entry -inf. s == inf: the slice holds
  # +inf, so all of it is NaN. (No NaN is formed on the way for s == 0.)
  out = xc - m - jnp.log(jnp.where(s == 0, 1.0, s))
  out = jnp.where(jnp.isinf(s), jnp.nan, out).astype(x.dtype)
  return out, out


def _log_softmax_bwd(axes, out, g):
  # d log_softmax: g - softmax * sum(g), with the sum and the result taken
  # over the support only (out == -inf marks masked or -inf entries).
  oc = out.astype(compute_dtype(out.dtype))
  support = oc != _NEG_INF
  gc = jnp.where(support, g.astype(oc.dtype), 0.0)
  dx = gc - jnp.exp(oc) * jnp.sum(gc, axis=axes, keepdims=True)
  return jnp.where(support, dx, 0.0).astype(out.dtype), None


_log_softmax.defvjp(_log_softmax_fwd, _log_softmax_bwd)


def log_softmax(x: jax.typing.ArrayLike, axis: int | tuple[int, ...] = -1,
                where: jax.typing.ArrayLike | None = None) -> jax.Array:
  r"""Log-softmax over ``axis``, stable, with a hand-written gradient.

  .. math::
    \mathrm{log\_softmax}(x)_i = (x_i - m) - \log \sum_j \exp(x_j - m)

  Args:
    x: floating array of any shape.
    axis: int or tuple of ints to normalise over.
    where: optional boolean mask broadcastable to ``x.shape``.

  Returns:
    An array of ``x``'s shape and dtype: ``-inf`` on masked and ``-inf``
    entries (their gradient is exactly 0), ``-inf`` everywhere in a slice with
    an empty support (zero gradient), NaN in a slice holding NaN or ``+inf``.
    The gradient keeps only the output as residual:
    ``dx = g - exp(out) * sum(g)`` over the support.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jax_softmax import log_softmax
    >>> log_softmax(jnp.array([0.0, -1e4]))
    Array([     0., -10000.], dtype=float32)
  """
  x, axes, mask = _prepare(x, axis, where)
  return _log_softmax(x, axes, mask)


# --------------------------------------------------------------------------
# logsumexp


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _logsumexp(x, axes, keepdims, mask):
  return _logsumexp_fwd(x, axes, keepdims, mask)[0]


def _logsumexp_fwd(x, axes, keepdims, mask):
  e, s, m = _shifted_exp_sum(x, axes, mask)
  lse = jnp.log(s) + m
  p = _normalize(e, s).astype(x.dtype)
  if not keepdims:
    lse = jnp.squeeze(lse, axis=axes)
  return lse.astype(x.dtype), p


def _logsumexp_bwd(axes, keepdims, p, g):
  if not keepdims:
    g = jnp.expand_dims(g, axes)
  pc = p.astype(compute_dtype(p.dtype))
  return (pc * g.astype(pc.dtype)).astype(p.dtype), None


_logsumexp.defvjp(_logsumexp_fwd, _logsumexp_bwd)


def logsumexp(x: jax.typing.ArrayLike,
              axis: int | tuple[int, ...] | None = None,
              keepdims: bool = False,
              where: jax.typing.ArrayLike | None = None) -> jax.Array:
  r"""Stable :math:`\log \sum_i \exp(x_i)` over ``axis`` (all axes if None).

  .. math::
    \mathrm{lse}(x) = m + \log \sum_i \exp(x_i - m), \qquad m = \max_i x_i

  Args:
    x: floating array of any shape.
    axis: int, tuple of ints, or None (all axes), as ``jax.nn.logsumexp``.
    keepdims: keep the reduced axes with size 1.
    where: optional boolean mask broadcastable to ``x.shape``.

  Returns:
    ``x.dtype`` array: ``-inf`` for a slice with an empty support (zero
    gradient), ``+inf`` if the slice holds ``+inf`` (NaN gradient), NaN if it
    holds NaN. The gradient is ``g * softmax(x)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jax_softmax import logsumexp
    >>> logsumexp(jnp.array([1000.0, 1000.0]))
    Array(1000.6932, dtype=float32)
  """
  x, axes, mask = _prepare(x, axis, where, axis_default_all=True)
  return _logsumexp(x, axes, bool(keepdims), mask)
