"""softmax, log_softmax and logsumexp with hand-written gradients.

All three share one stable reduction, :func:`_sums`: subtract the per-slice
maximum ``m`` of the support, exponentiate, (scale by ``b``,) sum. They take
``jax.nn``'s signatures and argument promotion (integer and boolean inputs
become float32, or float64 for 64-bit integers), compute in float32 (or
float64) for low-precision inputs and return the (promoted) input dtype.

Conventions (tested):

* The support of a slice is the set of entries with ``where`` True, ``x``
  not ``-inf`` (and, for logsumexp, ``b != 0``). Off the support, softmax
  gives 0, log_softmax ``-inf``, and the gradient with respect to ``x`` is
  exactly 0. The support is decided from the inputs, never from the rounded
  output: an entry whose log_softmax overflows to ``-inf`` (float16
  ``[4e4, -4e4]``) keeps its gradient.
* A slice with nothing in its support (an empty class axis included) gives
  softmax 0, log_softmax and logsumexp ``-inf`` (sign 0), and zero gradients
  (``jax.nn`` gives NaN for a slice of ``-inf``).
* NaN or ``+inf`` anywhere in the support of a slice makes that slice NaN,
  values and gradients (logsumexp of a ``+inf`` slice is ``+inf``). Masked
  entries may hold anything.
* No NaN is formed for inputs whose results are NaN-free (eager, ``jit``,
  ``disable_jit``; values and gradients): ``jax_debug_nans`` only fires
  for NaN results (``jax_debug_infs`` also for masks, ``b = 0`` and
  ``-inf`` inputs, which put a ``-inf`` into the computation).

Differentiation: ``jax.custom_vjp`` functions. Reverse mode works, and so
do second derivatives through the hand-written (differentiable) backward,
reverse over reverse and forward over reverse (``jax.hessian``); only
forward mode of the functions themselves (``jax.jvp(f)``) raises.
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple, overload

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from jax_softmax import _checks
from jax_softmax._numerics import NEG_INF as _NEG_INF
from jax_softmax._numerics import (
  compute_dtype,
  log_of_sum,
  sharded_like,
  shift_exp,
)

Axis = int | tuple[int, ...] | None


class _Sums(NamedTuple):
  """One slice reduction, in the compute dtype; kept dims have size 1."""

  xa: jax.Array     # x, -inf where ``where`` is False (b == 0 entries kept)
  xs: jax.Array     # x, -inf off the entries summed (masked, b == 0)
  shift: jax.Array  # m: max of xs, 0 where that is not finite
  scale: jax.Array | int  # k: the terms carry 2**-k (0 without b)
  empty: jax.Array  # bool: the support is empty (max of xs is -inf)
  terms: jax.Array  # the summands: 2**-k b exp(xs - m), 0 off the support
  total: jax.Array  # the sum of the terms
  log_abs: jax.Array  # log |total| + k log 2, to the last ulp for tiny terms


# log 2 = _LN2_HI + _LN2_LO, _LN2_HI with 9 significant bits: n * _LN2_HI is
# exact for |n| <= 2**13 (Cody and Waite's range reduction).
_LN2_HI = 0.693359375
_LN2_LO = float(np.log(2.0) - 0.693359375)
_MAX_N = 2**13


def _exp_pow2(t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(exp(r), n)`` with ``exp(t) = exp(r) 2**n``, ``|r| <= log(2) / 2``
  (``n`` an int32, 0 for non-finite ``t``, which stays in ``r``)."""
  n = jnp.clip(jnp.round(t / np.log(2.0)), -_MAX_N, _MAX_N)
  n = jnp.where(jnp.isfinite(t), n, 0.0)
  return jnp.exp((t - n * _LN2_HI) - n * _LN2_LO), n.astype(jnp.int32)


def _sums(x: jax.Array, axes: tuple[int, ...], mask: jax.Array | None,
          b: jax.Array | None = None) -> _Sums:
  """``s = 2**-k sum b exp(x - m)`` over ``axes`` (see :class:`_Sums`),
  ``m`` the maximum of ``x`` over the support.

  With ``b`` the scale ``2**-k`` keeps the largest term near 1 however far
  ``b`` is from 1 (``b = 3e38`` overflowed ``b exp(x - m)``, ``b = 1e10``
  beside ``exp(-90)`` underflowed): each term is ``mant * exp(r) *
  2**(e + n - k)``, from ``b = mant 2**e`` (``frexp``) and ``exp(x - m) =
  exp(r) 2**n``, ``k`` the largest ``e + n``. A power of 2 scales exactly,
  so a moderate ``b`` loses nothing (a cancelling sum of ``+-b`` at
  ``x = 3e4`` included), as ``max(x + log|b|)`` did not.

  Masking happens before the cast to the compute dtype and every product
  has both factors zeroed off the sum, so masked entries (and ``b == 0``
  entries) may hold anything without a NaN being formed. ``m`` and ``k``
  carry no gradient: every result is invariant to them.
  """
  cdt = compute_dtype(x.dtype)
  xa = _astype(x if mask is None else jnp.where(mask, x, _NEG_INF), cdt)
  xs = xa if b is None else jnp.where(b != 0, xa, _NEG_INF)
  top = jnp.max(xs, axis=axes, keepdims=True, initial=_NEG_INF)
  m, t, e = shift_exp(xs, top)
  at_top = xs == m
  k: jax.Array | int = 0
  if b is not None:
    bw = _astype(b if mask is None else jnp.where(mask, b, 0.0), cdt)
    # frexp of a subnormal, scaled up first (its exponent is wrong).
    fi = jnp.finfo(cdt)
    sub = jnp.abs(bw) < fi.smallest_normal
    mant, be = jnp.frexp(jnp.ldexp(bw, jnp.where(sub, fi.nmant, 0)))
    er, n = _exp_pow2(t)
    p2 = be + n - jnp.where(sub, fi.nmant, 0)
    # Terms whose exp(x - m) is 0 (x - m = -inf: a spread beyond the float
    # range) take no part in k (b = 1e10 there once scaled the top term to
    # 0).
    on = t > _NEG_INF
    none = -4 * _MAX_N
    kb = jnp.max(jnp.where(on, p2, none), axis=axes, keepdims=True,
                 initial=none)
    k = kb = jnp.where(kb == none, 0, kb)
    e = jnp.ldexp(mant * er, jnp.where(on, p2 - kb, 0))  # 0 off the support
    at_top = on & (p2 == kb)
  # total = u + v, u the terms at the maximum (1 each without b): log u +
  # log1p(v / u) keeps a tiny v (logsumexp([0, -20]) = 2.06e-9, where
  # log(1 + v) rounds to 0).
  u = jnp.sum(jnp.where(at_top, e, 0.0), axis=axes, keepdims=True)
  v = jnp.sum(jnp.where(at_top, 0.0, e), axis=axes, keepdims=True)
  if b is None:
    log_abs = log_of_sum(u, v)
  else:
    # u = mu 2**j with |mu| in [sqrt(1/2), sqrt(2)): log mu + log1p(v / u)
    # + (j + k) log 2, where j + k = 0 exactly for a sum near 1 (log u +
    # k log 2 as such rounded logsumexp([0, -20], b=[1, 1]) to 0).
    mu, j = jnp.frexp(u)
    low = jnp.abs(mu) < np.sqrt(0.5)
    j = jnp.where(low, j - 1, j)
    log_abs = log_of_sum(jnp.where(low, 2 * mu, mu), jnp.ldexp(v, -j)) + (
        (j + kb).astype(cdt) * np.log(2.0))
  return _Sums(xa=xa, xs=xs, shift=m, scale=k, empty=top == _NEG_INF,
               terms=e, total=u + v, log_abs=log_abs)


def _nan_where(bad: jax.Array, v: jax.Array) -> jax.Array:
  """``v``, NaN where ``bad`` (broadcast). Built as ``v + log(+-1)`` rather
  than ``where(bad, nan, v)``: no NaN exists anywhere for entries that are not
  bad, even op by op (``jax.disable_jit``) under ``jax_debug_nans``."""
  return v + jnp.log(jnp.where(bad, -1.0, 1.0))


def _normalize(u: jax.Array, s: jax.Array, bad: jax.Array | None = None
               ) -> jax.Array:
  """``u / s``; 0 where ``s == 0`` (empty support); NaN for the whole slice
  where ``s`` is not finite (``+inf`` or NaN in it) or ``bad`` holds."""
  ok = jnp.isfinite(s) & (s != 0)
  q = jnp.where(ok, u / jnp.where(ok, s, 1.0), 0.0)
  nan = ~jnp.isfinite(s)
  return _nan_where(nan if bad is None else nan | bad, q)


def _axes(axis: Axis, ndim: int) -> tuple[int, ...]:
  """``jax.nn``'s axis: an int, a tuple (possibly empty: no reduction) or
  None (all axes, none for a scalar)."""
  if axis is None:
    return tuple(range(ndim))
  if isinstance(axis, (tuple, list)) and not axis:
    return ()
  return _checks.normalize_axes(axis, ndim)


def _inexact_dtype(*arrays: jax.Array) -> jnp.dtype:
  """``jax.nn``'s promotion: the arguments' result type; booleans and
  integers become float32 (64-bit integers float64)."""
  dtype = jnp.result_type(*arrays)
  if jnp.issubdtype(dtype, jnp.inexact):
    return dtype
  return jnp.dtype(jnp.float64 if dtype.itemsize == 8 else jnp.float32)


def _asarray(x) -> jax.Array:
  # No conversion op for an array: under debug_nans any op that passes a
  # masked NaN through would raise, even a copy.
  return x if isinstance(x, jax.Array) else jnp.asarray(x)


def _astype(x: jax.Array, dtype) -> jax.Array:
  return x if x.dtype == dtype else x.astype(dtype)


def _prepare(x, axis: Axis, where, b=None, name: str = "x"):
  """Promotes and broadcasts the arguments: ``(x, b, axes, mask)``.

  ``x`` and ``b`` get their common floating dtype and broadcast shape
  (``TypeError`` for complex inputs, ``ValueError`` for shapes that do not
  broadcast); ``where`` must broadcast to that shape.
  """
  x = _asarray(x)
  arrays = [x]
  if b is not None:
    b = _asarray(b)
    try:
      shape = jnp.broadcast_shapes(x.shape, b.shape)
    except ValueError:
      raise ValueError(f"b of shape {b.shape} does not broadcast with {name} "
                       f"of shape {x.shape}.") from None
    x, b = (v if v.shape == shape else jnp.broadcast_to(v, shape)
            for v in (x, b))
    arrays.append(b)
  dtype = _inexact_dtype(*arrays)
  # The dtype check on an empty stand-in: no op touches x (see _asarray).
  _checks.as_float_array(np.zeros((0,), dtype), name)
  x = _astype(x, dtype)
  if b is not None:
    b = _astype(b, dtype)
  axes = _axes(axis, x.ndim)
  mask = None
  if where is not None:
    mask = _checks.broadcast_mask(_checks.as_bool_mask(where), x.shape, name)
  return x, b, axes, mask


# --------------------------------------------------------------------------
# softmax


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _softmax(x, axes, mask):
  return _softmax_fwd(x, axes, mask)[0]


def _softmax_fwd(x, axes, mask):
  st = _sums(x, axes, mask)
  y = _normalize(st.terms, st.total).astype(x.dtype)
  return y, y


def _softmax_bwd(axes, y, g):
  # d softmax: y * (g - <g, y>); zero wherever y == 0 (off the support).
  yc = y.astype(compute_dtype(y.dtype))
  gc = g.astype(yc.dtype)
  dx = yc * (gc - jnp.sum(gc * yc, axis=axes, keepdims=True))
  return sharded_like(dx.astype(y.dtype), y), None


_softmax.defvjp(_softmax_fwd, _softmax_bwd)


def softmax(x: jax.typing.ArrayLike, axis: Axis = -1,
            where: jax.typing.ArrayLike | None = None) -> jax.Array:
  r"""Softmax over ``axis``, stable, with a hand-written gradient.

  .. math::
    \mathrm{softmax}(x)_i = \frac{\exp(x_i - m)}{\sum_{j \in S} \exp(x_j - m)},
    \qquad m = \max_{j \in S} x_j

  for ``i`` in the support ``S`` (``where`` True and ``x > -inf``), 0 off it.

  Args:
    x: array of any shape; integer and boolean arrays are promoted to float32
      (float64 for 64-bit integers), as ``jax.nn`` does (which rejects
      booleans here and computes unsigned ones in their own dtype).
    axis: int, tuple of ints (``()``: none) or None (all axes): the axes that
      sum to 1.
    where: optional boolean mask broadcastable to ``x.shape``; masked entries
      get probability 0 and gradient 0, whatever they hold.

  Returns:
    An array of ``x``'s shape and (promoted) dtype. A slice with an empty
    support (all masked or ``-inf``, or a zero-length axis) gives zeros
    (``jax.nn.softmax`` gives NaN for a slice of ``-inf``). NaN or ``+inf``
    in the support of a slice gives NaN for that slice, values and
    gradients. The gradient keeps only the output as residual:
    ``dx = y * (g - sum(g * y))``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jax_softmax import softmax
    >>> softmax(jnp.array([1000.0, 1000.0, -jnp.inf]))
    Array([0.5, 0.5, 0. ], dtype=float32)
  """
  x, _, axes, mask = _prepare(x, axis, where)
  return _softmax(x, axes, mask)


# --------------------------------------------------------------------------
# log_softmax


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _log_softmax(x, axes, mask):
  return _log_softmax_fwd(x, axes, mask)[0]


def _log_softmax_fwd(x, axes, mask):
  st = _sums(x, axes, mask)
  # s == 0: empty support, every entry is -inf already.
  out = st.xs - st.shift - jnp.where(st.total == 0, 0.0, st.log_abs)
  out = _nan_where(~jnp.isfinite(st.total), out)
  # The residual: the output, except that support entries which overflow
  # to -inf in x's dtype hold its lowest finite value instead. exp() of
  # either is 0, but the backward can tell them from masked entries.
  lowest = jnp.finfo(x.dtype).min
  res = jnp.where(st.xs > _NEG_INF, jnp.maximum(out, lowest), out)
  return out.astype(x.dtype), res.astype(x.dtype)


def _log_softmax_bwd(axes, res, g):
  # d log_softmax: g - softmax * sum(g), with the sum and the result taken
  # over the support only (res == -inf exactly off it; NaN slices stay NaN).
  rc = res.astype(compute_dtype(res.dtype))
  support = rc != _NEG_INF
  gc = jnp.where(support, g.astype(rc.dtype), 0.0)
  dx = gc - jnp.exp(rc) * jnp.sum(gc, axis=axes, keepdims=True)
  return sharded_like(jnp.where(support, dx, 0.0).astype(res.dtype),
                      res), None


_log_softmax.defvjp(_log_softmax_fwd, _log_softmax_bwd)


def log_softmax(x: jax.typing.ArrayLike, axis: Axis = -1,
                where: jax.typing.ArrayLike | None = None) -> jax.Array:
  r"""Log-softmax over ``axis``, stable, with a hand-written gradient.

  .. math::
    \mathrm{log\_softmax}(x)_i = (x_i - m) - \log \sum_{j \in S} \exp(x_j - m)

  for ``i`` in the support ``S`` (``where`` True and ``x > -inf``), ``-inf``
  off it; :math:`\partial / \partial x = g - \mathrm{softmax}(x) \sum_S g` on
  ``S``, 0 off it.

  Args:
    x: array of any shape; integer and boolean arrays are promoted to float32
      (float64 for 64-bit integers), as ``jax.nn`` does (which rejects
      booleans here and computes unsigned ones in their own dtype).
    axis: int, tuple of ints (``()``: none) or None (all axes) to normalise
      over.
    where: optional boolean mask broadcastable to ``x.shape``.

  Returns:
    An array of ``x``'s shape and (promoted) dtype: ``-inf`` on masked and
    ``-inf`` entries (their gradient is exactly 0), ``-inf`` everywhere in a
    slice with an empty support (zero gradient), NaN in a slice whose support
    holds NaN or ``+inf``. An entry of the support whose value overflows to
    ``-inf`` (float16 ``[4e4, -4e4]``) keeps its gradient ``g_i`` (its
    probability underflows to 0).

    Memory: the backward keeps one array of the output's shape and dtype,
    the output with such overflowed entries set to the dtype's lowest finite
    value (so the support is not read off the rounded output). This is the
    cheapest correct residual: no mask and no copy of ``x`` (a float32 copy
    of the output would double a half-precision residual, and still
    overflow for bfloat16 or float32 inputs near ``+-2e38``).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jax_softmax import log_softmax
    >>> log_softmax(jnp.array([0.0, -1e4]))
    Array([     0., -10000.], dtype=float32)
  """
  x, _, axes, mask = _prepare(x, axis, where)
  return _log_softmax(x, axes, mask)


# --------------------------------------------------------------------------
# logsumexp


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _logsumexp(x, b, mask, axes, keepdims, return_sign):
  # The value alone (no residuals: d/db's exp of b == 0 entries is formed
  # only when differentiating, so their NaN never is otherwise).
  return _lse_outputs(_sums(x, axes, mask, b), x.dtype, axes, keepdims,
                      return_sign)


def _lse_outputs(st: _Sums, dtype, axes, keepdims, return_sign):
  s = st.total
  # Without return_sign a negative sum gives log(s) = NaN, as jax.nn.
  lse = st.shift + (st.log_abs if return_sign else
                    jnp.where(s < 0, jnp.log(s), st.log_abs))
  raw = (lse, jnp.sign(s)) if return_sign else (lse,)
  outs = tuple((o if keepdims else jnp.squeeze(o, axis=axes)).astype(dtype)
               for o in raw)
  return outs if return_sign else outs[0]


def _logsumexp_fwd(x, b, mask, axes, keepdims, return_sign):
  # symbolic_zeros: each argument arrives as a CustomVJPPrimal, so d/db
  # (whose b == 0 entries hold exp(a - lse) of any a, NaN included) is
  # formed only when b is differentiated.
  want_db = b is not None and b.perturbed
  x, b, mask = (None if v is None else v.value for v in (x, b, mask))
  st = _sums(x, axes, mask, b)
  s = st.total
  # Gradients: NaN where the sum cancels to exactly 0 on a non-empty
  # support (a pole of log|s|) or is negative without return_sign.
  bad = (s == 0) & ~st.empty
  if not return_sign:
    bad = bad | (s < 0)
  p = _normalize(st.terms, s, bad)                              # d lse / d x
  q = None   # d lse / d b = exp(a - m) / s, b == 0 entries included
  if want_db:
    er, n = _exp_pow2(st.xa - st.shift)
    q = _normalize(jnp.ldexp(er, n - st.scale), s, bad)
  # In the inputs' shardings (on Explicit mesh axes p and q may have
  # another), as their gradients must be.
  res = (sharded_like(p.astype(x.dtype), x),
         None if q is None else sharded_like(q.astype(x.dtype), b))
  return _lse_outputs(st, x.dtype, axes, keepdims, return_sign), res


def _logsumexp_bwd(axes, keepdims, return_sign, res, g):
  p, q = res
  if return_sign:
    g = g[0]   # the sign is piecewise constant: no gradient
  if isinstance(g, SymbolicZero):
    g = jnp.zeros(g.shape, g.dtype)
  if not keepdims:
    g = jnp.expand_dims(g, axes)
  gc = g.astype(compute_dtype(g.dtype))

  def times_g(r):
    return sharded_like((r.astype(gc.dtype) * gc).astype(r.dtype), r)

  # q is None when b is absent or not differentiated (None: a zero).
  return times_g(p), None if q is None else times_g(q), None


_logsumexp.defvjp(_logsumexp_fwd, _logsumexp_bwd, symbolic_zeros=True)


@overload
def logsumexp(a: jax.typing.ArrayLike, axis: Axis = None,
              b: jax.typing.ArrayLike | None = None, keepdims: bool = False,
              return_sign: Literal[False] = False,
              where: jax.typing.ArrayLike | None = None) -> jax.Array: ...


@overload
def logsumexp(a: jax.typing.ArrayLike, axis: Axis = None,
              b: jax.typing.ArrayLike | None = None, keepdims: bool = False,
              *, return_sign: Literal[True],
              where: jax.typing.ArrayLike | None = None
              ) -> tuple[jax.Array, jax.Array]: ...


@overload
def logsumexp(a: jax.typing.ArrayLike, axis: Axis = None,
              b: jax.typing.ArrayLike | None = None, keepdims: bool = False,
              return_sign: bool = False,
              where: jax.typing.ArrayLike | None = None
              ) -> jax.Array | tuple[jax.Array, jax.Array]: ...


def logsumexp(a: jax.typing.ArrayLike, axis: Axis = None,
              b: jax.typing.ArrayLike | None = None, keepdims: bool = False,
              return_sign: bool = False,
              where: jax.typing.ArrayLike | None = None
              ) -> jax.Array | tuple[jax.Array, jax.Array]:
  r"""Stable :math:`\log |\sum_i b_i \exp(a_i)|` over ``axis``, with a
  hand-written gradient for ``a`` and ``b``; ``jax.nn.logsumexp``'s signature.

  .. math::
    \mathrm{lse} = m + k \log 2 + \log |s|, \qquad
    s = 2^{-k} \sum_{i \in S} b_i \exp(a_i - m), \qquad m = \max_{i \in S} a_i

  over the support ``S`` (``where`` True, ``b_i != 0``, ``a_i > -inf``),
  ``k`` the largest binary exponent of the terms, so a huge or tiny ``b``
  (``3e38``, ``1e-30``) neither overflows nor underflows, and the scaling
  by a power of 2 is exact (the gradients below stay exact at large ``a``);
  ``log |s|`` is formed as ``log 2^j |mu| + log1p(...)`` about the largest
  terms, so a sum near 1 keeps a tiny ``lse`` (``2.06e-9`` for ``a = [0,
  -20]``, ``b = [1, 1]``). A subnormal ``b`` (``1e-40`` in float32) is 0
  where the backend flushes subnormals, as XLA:CPU does in every op.
  Gradients, with :math:`\sigma = \mathrm{sign}(s)`:

  .. math::
    \frac{\partial\,\mathrm{lse}}{\partial a_i}
    = \frac{2^{-k} b_i e^{a_i - m}}{s},
    \qquad
    \frac{\partial\,\mathrm{lse}}{\partial b_i} = \frac{2^{-k} e^{a_i - m}}{s}
    = \sigma\, e^{a_i - \mathrm{lse}}

  The ``b`` gradient is the true derivative at ``b_i = 0`` too (``jax.nn``
  gives 0 there, jax-ml/jax#22398); it is 0 only where ``where`` is False
  or ``a_i = -inf``.

  Args:
    a: array of any shape; integer and boolean arrays are promoted with ``b``
      as ``jax.nn.logsumexp`` does.
    axis: int, tuple of ints (``()``: none) or None (all axes).
    b: optional scale factors, broadcast with ``a`` (the result takes the
      broadcast shape and the common dtype). ``b_i = 0`` drops ``a_i`` from
      the sum even if it is ``+inf`` or NaN, as in ``jax.nn``; the gradient
      with respect to that ``b_i`` is then ``+inf`` or NaN, formed only
      when ``b`` is differentiated (``d/da`` alone forms no NaN, under
      ``jax_debug_nans`` too).
    keepdims: keep the reduced axes with size 1.
    return_sign: return ``(lse, sign)`` with ``lse = log|s| + m`` and ``sign``
      in ``{-1, 0, 1}`` (NaN for a NaN slice); otherwise a negative sum gives
      NaN (and NaN gradients).
    where: optional boolean mask broadcastable to the broadcast shape.

  Returns:
    ``lse`` (or ``(lse, sign)``), of the promoted dtype: ``-inf`` with sign
    0 and zero gradients for an empty support (an empty axis, or all
    masked, ``-inf`` or ``b = 0``); ``-inf`` with sign 0 and NaN gradients
    where ``s`` cancels to exactly 0; ``+inf`` (sign ``+-1``) with NaN
    gradients if the support holds ``+inf`` (NaN without ``return_sign`` if
    the sum is ``-inf``); NaN if it holds NaN. The backward keeps
    ``d lse / d a`` (and ``d lse / d b`` when ``b`` is differentiated),
    each of the broadcast shape.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jax_softmax import logsumexp
    >>> logsumexp(jnp.array([1000.0, 1000.0]))
    Array(1000.6932, dtype=float32)
    >>> logsumexp(jnp.array([0.0, 0.0]), b=jnp.array([1.0, -3.0]),
    ...           return_sign=True)
    (Array(0.6931472, dtype=float32), Array(-1., dtype=float32))
  """
  x, bb, axes, mask = _prepare(a, axis, where, b, name="a")
  return _logsumexp(x, bb, mask, axes, bool(keepdims), bool(return_sign))
