"""softmax, log_softmax, logsumexp: values, gradients, special values."""

import functools
import inspect
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from helpers import (
    LOW,
    TOL,
    assert_close,
    assert_rounded_close,
    finite_scale,
    saved_residuals,
)
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax.test_util import check_grads

import jax_softmax as js

NAMES = ("softmax", "log_softmax", "logsumexp")
LIB = {"softmax": js.softmax, "log_softmax": js.log_softmax,
       "logsumexp": js.logsumexp}
REF = {"softmax": (ref.softmax, ref.softmax_vjp),
       "log_softmax": (ref.log_softmax, ref.log_softmax_vjp),
       "logsumexp": (ref.logsumexp, ref.logsumexp_vjp)}


# --------------------------------------------------------------------------
# plain jax.numpy versions (autodiff references; non-empty slices only)


def _plain_stats(x, axis, where):
  mask = jnp.ones(x.shape, bool) if where is None else jnp.broadcast_to(
      where, x.shape)
  m = jax.lax.stop_gradient(
      jnp.max(jnp.where(mask, x, -jnp.inf), axis=axis, keepdims=True))
  xs = jnp.where(mask, x, m)
  e = jnp.where(mask, jnp.exp(xs - m), 0.0)
  return mask, m, xs, e, jnp.sum(e, axis=axis, keepdims=True)


def plain_softmax(x, axis=-1, where=None):
  _, _, _, e, s = _plain_stats(x, axis, where)
  return e / s


def plain_log_softmax(x, axis=-1, where=None):
  mask, m, xs, _, s = _plain_stats(x, axis, where)
  return jnp.where(mask, xs - m - jnp.log(s), -jnp.inf)


def plain_logsumexp(x, axis=None, keepdims=False, where=None):
  _, m, _, _, s = _plain_stats(x, axis, where)
  out = m + jnp.log(s)
  return out if keepdims else jnp.squeeze(out, axis)


PLAIN = {"softmax": plain_softmax, "log_softmax": plain_log_softmax,
         "logsumexp": plain_logsumexp}


def call(fn, x, axis, where):
  return fn(x, axis=axis, where=where)


def data(shape=(3, 4, 5), seed=0, scale=3.0):
  rng = np.random.default_rng(seed)
  return (scale * rng.standard_normal(shape)).astype(np.float32)


def nonempty_mask(shape, axis, seed=1):
  """A random class mask with at least one True per slice over ``axis``."""
  rng = np.random.default_rng(seed)
  mask = rng.random(shape) < 0.6
  axes = ref.normalize_axes(axis, len(shape))
  first = np.zeros(shape, bool)
  idx = tuple(slice(0, 1) if a in axes else slice(None)
              for a in range(len(shape)))
  first[idx] = True
  return mask | first


def out_shape(name, shape, axis):
  if name != "logsumexp":
    return shape
  axes = ref.normalize_axes(axis, len(shape))
  return tuple(s for a, s in enumerate(shape) if a not in axes)


CASES = [(-1, True), (0, False), ((0, 2), False), ((1, 2), True)]


# --------------------------------------------------------------------------
# values and gradients: float64 reference, plain autodiff, check_grads


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("axis,masked", CASES)
def test_float64_matches_reference(name, axis, masked):
  x = data()
  where = nonempty_mask(x.shape, axis) if masked else None
  g = data(out_shape(name, x.shape, axis), seed=2)
  with jax.enable_x64(True):
    out, vjp = jax.vjp(lambda x: call(LIB[name], x, axis, where),
                       jnp.asarray(x, jnp.float64))
    (dx,) = vjp(jnp.asarray(g, jnp.float64))
    chex.assert_type([out, dx], jnp.float64)
  fref, vref = REF[name]
  assert_close(out, fref(x, axis, where=where), jnp.float64)
  assert_close(dx, vref(x, g, axis, where=where), jnp.float64)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("axis,masked", CASES[::3])
def test_float32_matches_plain_autodiff(name, axis, masked):
  x = jnp.asarray(data())
  where = nonempty_mask(x.shape, axis) if masked else None
  g = jnp.asarray(data(out_shape(name, x.shape, axis), seed=2))
  out, vjp = jax.vjp(lambda x: call(LIB[name], x, axis, where), x)
  pout, pvjp = jax.vjp(lambda x: call(PLAIN[name], x, axis, where), x)
  chex.assert_trees_all_close(out, pout, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(vjp(g), pvjp(g), rtol=1e-5, atol=1e-5)
  chex.assert_type([out, vjp(g)[0]], jnp.float32)
  chex.assert_shape(out, out_shape(name, x.shape, axis))


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", (jnp.float32, jnp.float64))
@pytest.mark.parametrize("masked", (True,))
def test_check_grads(name, dtype, masked):
  axis = (0, 2) if name == "logsumexp" else -1
  where = nonempty_mask((2, 3, 4), axis) if masked else None

  def f(x):
    out = call(LIB[name], x, axis, where)
    if name == "log_softmax" and masked:
      out = jnp.where(where, out, 0.0)   # -inf at masked entries
    return out

  with jax.enable_x64(dtype == jnp.float64):
    x = jnp.asarray(data((2, 3, 4), scale=1.0), dtype)
    eps = 1e-3 if dtype == jnp.float32 else 1e-6
    check_grads(f, (x,), order=1, modes=["rev"], eps=eps)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("masked", (True,))
def test_reverse_over_reverse(name, masked):
  axis = -1
  shape = (2, 4)
  where = nonempty_mask(shape, axis) if masked else None
  with jax.enable_x64(True):
    x = jnp.asarray(data(shape), jnp.float64)
    c = jnp.asarray(data(out_shape(name, shape, axis), seed=3), jnp.float64)
    v = jnp.asarray(data(shape, seed=4), jnp.float64)

    def objective(fn):
      def f(x):
        out = call(fn, x, axis, where)
        if name == "log_softmax" and masked:
          out = jnp.where(where, out, 0.0)
        return jnp.sum(c * out)
      return f

    @jax.jit
    def second_order(x):
      out = []
      for fn in (LIB[name], PLAIN[name]):
        f = objective(fn)
        out.append((jax.jacrev(jax.grad(f))(x),
                    jax.grad(lambda x, f=f: jnp.vdot(jax.grad(f)(x), v))(x)))
      return out

    (hess, hvp), (phess, phvp) = second_order(x)
    chex.assert_trees_all_close(hess, phess, rtol=1e-10, atol=1e-12)
    chex.assert_trees_all_close(hvp, phvp, rtol=1e-10, atol=1e-12)
    # Not trivially zero: the Hessian of these functions is not.
    assert float(jnp.max(jnp.abs(hess))) > 1e-3


# --------------------------------------------------------------------------
# dtypes


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("masked", (False, True))
def test_low_precision_against_float64(name, dtype, masked):
  axis = -1
  xl = jnp.asarray(data((3, 8)), dtype)
  x64 = np.asarray(xl.astype(jnp.float32), np.float64)
  where = nonempty_mask(xl.shape, axis) if masked else None
  gl = jnp.asarray(data(out_shape(name, xl.shape, axis), seed=2), dtype)
  g64 = np.asarray(gl.astype(jnp.float32), np.float64)
  out, vjp = jax.vjp(lambda x: call(LIB[name], x, axis, where), xl)
  (dx,) = vjp(gl)
  chex.assert_type([out, dx], dtype)
  fref, vref = REF[name]
  expected = fref(x64, axis, where=where)
  scale = np.max(np.abs(expected[np.isfinite(expected)]))
  assert_close(out, expected, dtype, scale)
  dref = vref(x64, g64, axis, where=where)
  assert_close(dx, dref, dtype, np.max(np.abs(dref)))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_accumulates_in_float32(name, dtype):
  # 4096 equal logits: a running float16 (bfloat16) sum of ones stalls at
  # 2048 (256); float32 accumulation gives 1/4096 and log(4096).
  n = 4096
  x = jnp.zeros((n,), dtype)
  out = call(LIB[name], x, -1, None)
  expected = {"softmax": 1.0 / n, "log_softmax": -np.log(n),
              "logsumexp": np.log(n)}[name]
  np.testing.assert_allclose(np.asarray(out, np.float64), expected,
                             rtol=TOL[dtype][0])


# --------------------------------------------------------------------------
# transformations


TRANSFORMS = ("eager", "jit", "vmap")


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_eager_jit_vmap(name, transform):
  x = data((2, 3, 4, 5))     # slices of the shape the tests above use
  where = nonempty_mask(x.shape[1:], -1)
  g = data((2,) + out_shape(name, x.shape[1:], -1), seed=2)

  def f(x, g):
    out, vjp = jax.vjp(lambda x: call(LIB[name], x, -1, where), x)
    return out, vjp(g)[0]

  if transform == "vmap":
    out, dx = jax.vmap(f)(jnp.asarray(x), jnp.asarray(g))
  else:
    fn = jax.jit(f) if transform == "jit" else f
    outs = [fn(jnp.asarray(x[i]), jnp.asarray(g[i])) for i in range(2)]
    out, dx = (jnp.stack(o) for o in zip(*outs, strict=True))
  fref, vref = REF[name]
  for i in range(2):
    assert_close(out[i], fref(x[i], -1, where=where), jnp.float32)
    assert_close(dx[i], vref(x[i], g[i], -1, where=where), jnp.float32)


def test_logsumexp_defaults_and_keepdims():
  x = data((2, 3))
  chex.assert_shape(js.logsumexp(x), ())
  assert_close(js.logsumexp(x), ref.logsumexp(x), jnp.float32, 10)
  out = js.logsumexp(x, axis=1, keepdims=True)
  chex.assert_shape(out, (2, 1))
  assert_close(out, ref.logsumexp(x, 1, keepdims=True), jnp.float32, 10)
  g = data((2, 1), seed=5)
  (dx,) = jax.vjp(lambda x: js.logsumexp(x, axis=1, keepdims=True),
                  jnp.asarray(x))[1](jnp.asarray(g))
  assert_close(dx, ref.logsumexp_vjp(x, g, 1, keepdims=True), jnp.float32)


def test_jax_nn_defaults():
  x = data((2, 3, 4))
  for name in ("softmax", "log_softmax"):
    chex.assert_trees_all_close(LIB[name](x), getattr(jax.nn, name)(x),
                                rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(js.logsumexp(x), jax.nn.logsumexp(x),
                              rtol=1e-6)


# --------------------------------------------------------------------------
# special values


def vjp_of(name, x, g, axis=-1, where=None, jit=False):
  def run(x, g):
    out, vjp = jax.vjp(lambda x: call(LIB[name], x, axis, where), x)
    return out, vjp(g)[0]

  out, dx = (jax.jit(run) if jit else run)(jnp.asarray(x), jnp.asarray(g))
  return np.asarray(out), np.asarray(dx)


SPECIAL = np.array([[0.5, -np.inf, 1.0, -2.0],     # -inf entry
                    [1.0, 2.0, 3.0, 4.0],          # masked entirely below
                    [-np.inf] * 4,                 # empty support
                    [0.0, np.nan, 1.0, 2.0],       # NaN
                    [1.0, 2.0, np.nan, np.inf]],   # NaN and +inf, masked
                   np.float32)
SPECIAL_MASK = np.array([[True] * 4, [False] * 4, [True] * 4, [True] * 4,
                         [True, True, False, False]])


@pytest.mark.parametrize("name", NAMES)
def test_special_values_table(name):
  g = data((5, 4), seed=7) if name != "logsumexp" else data((5,), seed=7)
  out, dx = vjp_of(name, SPECIAL, g, -1, SPECIAL_MASK)
  fref, vref = REF[name]
  expected = fref(SPECIAL, -1, where=SPECIAL_MASK)
  dexpected = vref(SPECIAL, g, -1, where=SPECIAL_MASK)
  assert_close(out, expected, jnp.float32)
  assert_close(dx, dexpected, jnp.float32)
  # Spelled out, row by row (+inf: see the tests below):
  finite = [0, 4]    # row 4: NaN and +inf sit on masked entries
  assert np.all(np.isfinite(dx[finite]))
  assert dx[0, 1] == 0.0                               # -inf entry
  assert np.all(dx[1] == 0.0) and np.all(dx[2] == 0.0)  # empty support
  assert np.all(np.isnan(dx[3]))
  if name == "softmax":
    assert out[0, 1] == 0.0 and np.all(out[1:3] == 0.0)
    assert np.all(np.isnan(out[3]))
  elif name == "log_softmax":
    assert out[0, 1] == -np.inf and np.all(out[1:3] == -np.inf)
    assert np.all(out[4, 2:] == -np.inf)
    assert np.all(np.isnan(out[3]))
  else:
    assert out[1] == -np.inf and out[2] == -np.inf and np.isnan(out[3])


@pytest.mark.parametrize("name", ("softmax", "log_softmax"))
def test_positive_inf_makes_slice_nan(name):
  """Docstrings: NaN or +inf in a slice gives NaN for that slice."""
  x = np.array([[1.0, np.inf, 2.0], [1.0, 2.0, 3.0]], np.float32)
  out = np.asarray(LIB[name](x))
  assert np.all(np.isnan(out[0])), out
  assert np.all(np.isfinite(out[1]))


def test_logsumexp_positive_inf_gradient_is_nan():
  """Docstring: ``+inf`` if the slice holds ``+inf`` (NaN gradient)."""
  x = jnp.array([[1.0, jnp.inf, 2.0], [1.0, 2.0, 3.0]])
  out, dx = vjp_of("logsumexp", x, np.ones(2, np.float32), axis=1)
  assert out[0] == np.inf
  assert np.all(np.isnan(dx[0])), dx
  assert np.all(np.isfinite(dx[1]))


@pytest.mark.parametrize("name", NAMES)
def test_all_masked_gives_zero_gradient_not_nan(name):
  x = data((2, 3))
  where = np.array([[False] * 3, [True, False, True]])
  g = np.ones((2, 3) if name != "logsumexp" else (2,), np.float32)
  out, dx = vjp_of(name, x, g, -1, where)
  empty = {"softmax": 0.0, "log_softmax": -np.inf, "logsumexp": -np.inf}
  assert np.all(out[0] == empty[name])
  np.testing.assert_array_equal(dx[0], 0.0)
  np.testing.assert_array_equal(dx[1, 1], 0.0)
  assert np.all(np.isfinite(dx))


@pytest.mark.parametrize("name", NAMES)
def test_masked_cases_under_debug_nans_in_jit(name):
  x = jnp.asarray(SPECIAL[:3])
  where = jnp.asarray(SPECIAL_MASK[:3])

  def f(x):
    out = call(LIB[name], x, -1, where)
    return jnp.sum(jnp.where(jnp.isfinite(out), out, 0.0))

  with jax.debug_nans(True):
    val, dx = jax.jit(jax.value_and_grad(f))(x)
    jax.block_until_ready(dx)
  assert np.isfinite(val) and np.all(np.isfinite(dx))
  with jax.debug_nans(True), pytest.raises(FloatingPointError):
    # The context is live: a NaN output does raise.
    jax.block_until_ready(jax.jit(lambda x: LIB[name](x, axis=-1))(
        jnp.asarray(SPECIAL[3:4])))


# --------------------------------------------------------------------------
# residuals


@pytest.mark.parametrize("name", ("softmax", "log_softmax"))
@pytest.mark.parametrize("dtype", (jnp.float32, jnp.bfloat16))
@pytest.mark.parametrize("masked", (False, True))
def test_one_output_sized_residual(name, dtype, masked):
  """The backward keeps one array of the output's shape and dtype (the output
  itself for softmax; for log_softmax the output with overflowed entries at
  the lowest finite value), never the mask nor a float32 copy."""
  x = jnp.asarray(data((3, 5)), dtype)
  where = nonempty_mask((3, 5), -1) if masked else None
  res = saved_residuals(lambda x: LIB[name](x, where=where), x)
  avals = [(r.shape, r.dtype) for r in res]
  assert len(res) == 1, avals
  assert res[0].shape == x.shape and res[0].dtype == x.dtype, avals


# --------------------------------------------------------------------------
# precision


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("center", (1000.0, -1000.0))
def test_float32_precision_near_1000(name, center):
  x = (center + data((4, 16), scale=1.0)).astype(np.float32)
  out = np.asarray(LIB[name](x, axis=-1), np.float64)
  expected = REF[name][0](x, -1)
  ulp = np.spacing(np.abs(expected).astype(np.float32)).astype(np.float64)
  assert np.all(np.abs(out - expected) <= 4 * ulp + 1e-45), (
      np.max(np.abs(out - expected) / ulp))


# --------------------------------------------------------------------------
# argument errors


@pytest.mark.parametrize("name", NAMES)
def test_errors_say_expected_and_got(name):
  fn = LIB[name]
  with pytest.raises(TypeError, match="floating.*complex64"):
    fn(jnp.ones(3, jnp.complex64))
  with pytest.raises(ValueError, match="out of range.*rank 2"):
    fn(jnp.ones((2, 3)), axis=2)
  with pytest.raises(ValueError, match="repeats"):
    fn(jnp.ones((2, 3)), axis=(0, -2))
  with pytest.raises(TypeError, match="boolean.*int32"):
    fn(jnp.ones((2, 3)), axis=-1, where=jnp.ones((2, 3), jnp.int32))
  with pytest.raises(ValueError, match=r"\(4,\).*\(2, 3\)"):
    fn(jnp.ones((2, 3)), axis=-1, where=jnp.ones((4,), bool))


# --------------------------------------------------------------------------
# the support comes from the inputs, not from the rounded output


@pytest.mark.slow
@pytest.mark.parametrize("dtype,big", [(jnp.float16, 4e4),
                                       (jnp.bfloat16, 3e38),
                                       (jnp.float32, 3e38)])
@pytest.mark.parametrize("jit", (False, True))
def test_log_softmax_overflowed_entry_keeps_its_gradient(dtype, big, jit):
  """``out[1] = -2 big`` overflows to ``-inf`` but is in the support: its
  gradient is ``g_1`` (its probability is 0); the masked entry and the
  ``-inf`` entry keep gradient 0."""
  x = jnp.array([big, -big, 1.0, -jnp.inf], dtype)
  where = np.array([True, True, False, True])
  g = np.array([0.5, 2.0, 3.0, 4.0], np.float32)
  out, dx = vjp_of("log_softmax", x, jnp.asarray(g, dtype), -1, where,
                   jit=jit)
  chex.assert_type([out, dx], dtype)
  np.testing.assert_array_equal(out.astype(np.float64),
                                [0.0, -np.inf, -np.inf, -np.inf])
  np.testing.assert_array_equal(dx.astype(np.float64), [-2.0, 2.0, 0.0, 0.0])
  # jax.nn agrees on the unmasked pair: d out[1] / dx = [-1, 1].
  for i in range(2):
    ours, theirs = (jax.grad(lambda x, f=f, i=i: f(x)[i].astype(jnp.float32))(
        x[:2]) for f in (js.log_softmax, jax.nn.log_softmax))
    np.testing.assert_array_equal(np.asarray(ours, np.float64),
                                  np.asarray(theirs, np.float64))


# --------------------------------------------------------------------------
# empty class axes


EMPTY = [((0,), -1), ((3, 0), -1), ((2, 0, 3), 1), ((2, 0, 3), (0, 1)),
         ((0, 4), None)]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape,axis", EMPTY)
def test_empty_class_axis(name, shape, axis):
  """Empty in, empty out; logsumexp of an empty slice is ``-inf`` (sign 0);
  the gradients are zeros of the input's shape."""
  x = np.zeros(shape, np.float32)
  expected = REF[name][0](x, axis)
  g = np.ones(expected.shape, np.float32)
  for jit in (False, True) if len(shape) < 3 else (True,):
    out, dx = vjp_of(name, x, g, axis, jit=jit)
    chex.assert_shape([out, dx], [expected.shape, shape])
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(dx, 0.0)
  if name == "logsumexp":
    (lse, sign), vjp = jax.vjp(
        lambda a, b: js.logsumexp(a, axis, b, return_sign=True),
        jnp.asarray(x), jnp.ones(shape))
    np.testing.assert_array_equal(lse, expected)
    np.testing.assert_array_equal(sign, 0.0)
    da, db = vjp((jnp.asarray(g), jnp.asarray(g)))
    chex.assert_shape([da, db], [shape, shape])


# --------------------------------------------------------------------------
# jax_debug_nans / jax_debug_infs


# Valid inputs whose results hold no NaN: a -inf entry, masked NaN and +inf,
# an all-masked row, an all -inf row; for logsumexp also b = 0 on an
# unmasked +inf and NaN scale factors on masked entries.
DEBUG_X = np.array([[0.5, -np.inf, 1.0, np.nan],
                    [np.inf, 2.0, 3.0, 4.0],
                    [1.0, 2.0, 3.0, 4.0],
                    [-np.inf] * 4,
                    [2.0, np.inf, 1.0, 0.0]], np.float32)
DEBUG_MASK = np.array([[True, True, True, False], [False, True, True, True],
                       [False] * 4, [True] * 4, [True] * 4])
DEBUG_B = np.array([[1.0, 2.0, 0.0, np.nan], [np.nan, 1.0, 0.0, 2.0],
                    [1.0] * 4, [1.0] * 4, [1.0, 0.0, 0.5, 2.0]], np.float32)
DEBUG_MODES = ("eager", "jit", "disable_jit")


def _values_and_grads(fn, args, mode):
  """``fn``'s outputs and its vjp at all-ones cotangents under ``mode``."""
  def run(*args):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(jax.tree.map(jnp.ones_like, out))

  if mode == "jit":
    return jax.block_until_ready(jax.jit(run)(*args))
  if mode == "disable_jit":
    with jax.disable_jit():
      return jax.block_until_ready(run(*args))
  return jax.block_until_ready(run(*args))


def _debug_cases(name):
  """``(fn, args, expected value, expected gradients)`` on DEBUG_X."""
  x, w = DEBUG_X, DEBUG_MASK
  if name != "logsumexp":
    rows = [0, 2, 3]                  # rows 1 and 4 hold an unmasked +inf
    x, w = x[rows], w[rows]
    g = np.ones(x.shape)
    return [(functools.partial(LIB[name], axis=-1, where=w), (x,),
             REF[name][0](x, -1, where=w), (REF[name][1](x, g, -1, where=w),))]
  g = np.ones(len(x))
  cases = []
  for b in (DEBUG_B, -DEBUG_B):
    kw = {"where": w, "b": b, "return_sign": True}
    def fn(x, b, w=w):
      return js.logsumexp(x, -1, b, return_sign=True, where=w)

    cases.append((fn, (x, b), ref.logsumexp(x, -1, **kw),
                  (ref.logsumexp_vjp(x, g, -1, **kw),
                   ref.logsumexp_vjp_b(x, g, -1, **kw))))
  return cases


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode", DEBUG_MODES)
def test_debug_nans_quiet_on_valid_inputs(name, mode):
  for fn, args, expected, dexpected in _debug_cases(name):
    args = tuple(jnp.asarray(a) for a in args)
    with jax.debug_nans(True):
      out, grads = _values_and_grads(fn, args, mode)
    chex.assert_trees_all_close(out, expected, rtol=1e-6)
    for d, de in zip(grads, dexpected, strict=True):
      assert_close(d, de, jnp.float32)
    for leaf in jax.tree.leaves((out, grads)):
      assert not np.any(np.isnan(np.asarray(leaf))), (out, grads)
  # The flag is live: a NaN in the support does raise.
  with jax.debug_nans(True), pytest.raises(FloatingPointError):
    _values_and_grads(lambda x: LIB[name](x, axis=-1),
                      (jnp.array([1.0, np.nan]),), mode)


@pytest.mark.parametrize("mode", DEBUG_MODES)
def test_debug_nans_quiet_on_a_nan_left_out_by_b(mode):
  # b = 0 drops a NaN (or +inf) entry from the sum: the value forms no
  # NaN (eager, it once formed a - m of every entry), nor does d/da (the
  # forward pass once formed d/db = exp(a - lse), NaN for that b, even
  # when b was not differentiated).
  a = jnp.array([[1.0, np.nan, 2.0], [np.inf, 0.0, -1.0]])
  b = jnp.array([[1.0, 0.0, 1.0], [0.0, 1.0, 2.0]])
  f = functools.partial(js.logsumexp, axis=-1, b=b)
  df = jax.grad(lambda a: jnp.sum(f(a)))
  want = ref.logsumexp(np.asarray(a), -1, b=np.asarray(b))
  with jax.debug_nans(True):
    if mode == "disable_jit":
      with jax.disable_jit():
        got, da = f(a), df(a)
    else:
      got, da = (jax.jit(f) if mode == "jit" else f)(a), (
          jax.jit(df) if mode == "jit" else df)(a)
  assert_close(got, want, jnp.float32)
  assert_close(da, ref.logsumexp_vjp(np.asarray(a), np.ones(2), -1,
                                     b=np.asarray(b)), jnp.float32)


def test_debug_nans_by_config_update_eager():
  """The issue's reproducer: eager softmax / logsumexp of ``[1, 2]``."""
  x = jnp.array([1.0, 2.0])
  jax.config.update("jax_debug_nans", True)
  try:
    y = js.softmax(x)
    lse = js.logsumexp(x)
    dx = jax.grad(js.logsumexp)(x)
  finally:
    jax.config.update("jax_debug_nans", False)
  assert_close(y, ref.softmax(x), jnp.float32)
  assert_close(lse, ref.logsumexp(x), jnp.float32)
  assert_close(dx, ref.softmax(x), jnp.float32)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode", ("eager", "jit"))
def test_debug_infs_quiet_on_finite_results(name, mode):
  """Finite inputs (no mask, nonzero b) with finite results form no inf."""
  x = data((2, 3))
  b = np.array([1.0, -2.0, 0.5], np.float32)
  fn = ((lambda x: LIB[name](x, axis=-1)) if name != "logsumexp" else
        (lambda x: js.logsumexp(x, -1, b, return_sign=True)))
  with jax.debug_infs(True):
    out, (dx,) = _values_and_grads(fn, (jnp.asarray(x),), mode)
  if name == "logsumexp":
    expected = ref.logsumexp(x, -1, b=b, return_sign=True)
    dexpected = ref.logsumexp_vjp(x, np.ones(2), -1, b=b, return_sign=True)
  else:
    expected, dexpected = (REF[name][0](x, -1),
                           REF[name][1](x, np.ones(x.shape), -1))
  chex.assert_trees_all_close(out, expected, rtol=1e-5)
  assert_close(dx, dexpected, jnp.float32)


# --------------------------------------------------------------------------
# jax.nn's signatures, promotion, b and return_sign


@pytest.mark.parametrize("name", NAMES)
def test_signature_is_jax_nns(name):
  def params(fn):
    return [(p.name, p.kind, p.default)
            for p in inspect.signature(fn).parameters.values()]

  assert params(LIB[name]) == params(getattr(jax.nn, name))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", (jnp.int8, jnp.uint8, jnp.int32,
                                   jnp.bool_))
def test_integer_and_bool_inputs_promote_like_jax_nn(name, dtype):
  x = np.array([[1, 0, 3], [2, 2, 0]])
  xi = jnp.asarray(x, dtype)
  out, vjp = jax.vjp(lambda x: LIB[name](x, axis=-1),
                     xi.astype(jnp.float32))  # the same function on floats
  chex.assert_type(LIB[name](xi, axis=-1), jnp.float32)
  np.testing.assert_array_equal(LIB[name](xi, axis=-1), out)
  assert_close(out, REF[name][0](np.asarray(xi, np.float64), -1),
               jnp.float32, 10)
  theirs = getattr(jax.nn, name)(xi.astype(jnp.float32), axis=-1)
  chex.assert_trees_all_close(out, theirs, rtol=1e-6)
  if dtype in (jnp.int8, jnp.int32):
    # jax.nn on the integers themselves (it rejects booleans in softmax and
    # log_softmax, and computes x - max in uint8, wrapping around; it warns
    # casting -inf to an integer in log_softmax).
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)
      theirs = getattr(jax.nn, name)(xi, axis=-1)
    chex.assert_type(theirs, jnp.float32)
    chex.assert_trees_all_close(out, theirs, rtol=1e-6)


@pytest.mark.slow
def test_promotion_with_b_and_x64():
  # jax.nn: the common type of a and b, then inexact.
  a, b16 = jnp.array([1, 2]), jnp.array([1.0, 2.0], jnp.float16)
  for b in (b16, 2, 2.0):
    ours, theirs = js.logsumexp(a, b=b), jax.nn.logsumexp(a, b=b)
    assert ours.dtype == theirs.dtype, (b, ours.dtype, theirs.dtype)
    chex.assert_trees_all_close(ours.astype(jnp.float32),
                                theirs.astype(jnp.float32), rtol=1e-3)
  with jax.enable_x64(True), warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)   # jax.nn, as above
    for dtype, expected in ((jnp.int64, jnp.float64), (jnp.int8, jnp.float32)):
      x = jnp.array([1, 2], dtype)
      ours, theirs = jax.jit(lambda x: ([f(x) for f in LIB.values()], [
          getattr(jax.nn, name)(x) for name in NAMES]))(x)
      chex.assert_type(ours + theirs, expected)
      chex.assert_trees_all_close(ours, theirs, rtol=1e-6)


def plain_lse_b(a, b, axis, where, return_sign):
  """``log|sum b exp(a)|`` by plain jax.numpy (its autodiff: the true
  derivatives, b = 0 included); NaN for a negative sum without
  ``return_sign``."""
  mask = jnp.ones(a.shape, bool) if where is None else where
  summed = mask & (b != 0)
  m = jnp.max(jnp.where(summed, a, -jnp.inf), axis=axis, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  s = jnp.sum(jnp.where(mask, b * jnp.exp(jnp.where(mask, a, m) - m), 0.0),
              axis=axis, keepdims=True)
  out = jnp.squeeze(m + jnp.log(jnp.abs(s) if return_sign else s), axis)
  return (out, jnp.squeeze(jnp.sign(s), axis)) if return_sign else out


B = np.array([[1.0, 0.0, 2.0, 0.5], [-1.0, 2.0, 0.0, -0.5],
              [0.0, 0.0, 3.0, 0.0]])


@pytest.mark.slow
@pytest.mark.parametrize("axis,return_sign,masked", [
    (-1, False, False), (-1, True, True), (0, False, True), (0, True, False),
    ((0, 1), False, True), ((0, 1), True, False)])
def test_logsumexp_b_values_and_gradients(axis, return_sign, masked):
  """Values and both gradients against the float64 reference, the plain
  autodiff version and jax.nn (whose b-gradient is 0 at b = 0,
  jax-ml/jax#22398: compared on b != 0 only)."""
  a = data((3, 4), seed=3, scale=1.0).astype(np.float64)
  where = nonempty_mask(a.shape, axis, seed=4) if masked else None
  g = data(out_shape("logsumexp", a.shape, axis), seed=5).astype(np.float64)
  with jax.enable_x64(True):
    args = (jnp.asarray(a), jnp.asarray(B))
    fns = {"ours": lambda a, b: js.logsumexp(a, axis, b,
                                             return_sign=return_sign,
                                             where=where),
           "plain": lambda a, b: plain_lse_b(
               a, b, ref.normalize_axes(axis, 2), where, return_sign),
           "jax.nn": lambda a, b: jax.nn.logsumexp(
               a, axis, b, return_sign=return_sign, where=where)}
    ct = (jnp.asarray(g), jnp.zeros_like(g)) if return_sign else g

    @jax.jit
    def run(a, b):
      res = {}
      for k, fn in fns.items():
        out, vjp = jax.vjp(fn, a, b)
        res[k] = (out, vjp(ct))
      return res

    res = run(*args)
  out, (da, db) = res["ours"]
  kw = {"where": where, "b": B, "return_sign": return_sign}
  chex.assert_trees_all_close(out, ref.logsumexp(a, axis, **kw), rtol=1e-12)
  ok = np.isfinite(ref.logsumexp(a, axis, keepdims=True, **kw)[0]
                   if return_sign else
                   ref.logsumexp(a, axis, keepdims=True, **kw))
  ok = np.broadcast_to(ok, a.shape)
  assert_close(da, ref.logsumexp_vjp(a, g, axis, **kw), jnp.float64)
  assert_close(db, ref.logsumexp_vjp_b(a, g, axis, **kw), jnp.float64)
  # Where the value is finite (a negative sum without return_sign is NaN,
  # with NaN gradients here; plain autodiff and jax.nn give finite ones).
  for k in ("plain", "jax.nn"):
    kout, (kda, kdb) = res[k]
    chex.assert_trees_all_close(kout, out, rtol=1e-12)
    keep = ok if k == "plain" else ok & (B != 0)
    for mine, theirs, where_ in ((da, kda, ok), (db, kdb, keep)):
      np.testing.assert_allclose(np.asarray(mine)[where_],
                                 np.asarray(theirs)[where_], rtol=1e-12,
                                 atol=1e-14, err_msg=k)
  # The true derivative where b = 0 (jax.nn: 0): e^a / s, not 0.
  assert np.all(np.asarray(db)[ok & (B == 0) & ref._mask(where, a.shape)]
                != 0.0)


def test_logsumexp_b_special_cases():
  z3 = jnp.zeros(3)
  # log(sum(b)): d/db = 1 / sum(b) for every entry, b = 0 included.
  db = jax.grad(lambda b: js.logsumexp(z3, b=b))(jnp.array([2.0, 0.0, 5.0]))
  np.testing.assert_allclose(db, np.full(3, 1 / 7), rtol=1e-6)
  # b = 0 drops a = +inf (and NaN) from the sum, as jax.nn; d/da = 0 there.
  a = jnp.array([1.0, jnp.inf, jnp.nan, 0.0])
  b = jnp.array([2.0, 0.0, 0.0, 5.0])
  lse, dx = jax.value_and_grad(lambda a: js.logsumexp(a, b=b))(a)
  chex.assert_trees_all_close(lse, jax.nn.logsumexp(a, b=b))
  np.testing.assert_allclose(dx, ref.logsumexp_vjp(a, 1.0, b=b), rtol=1e-6)
  assert dx[1] == 0 and dx[2] == 0
  # A negative sum: NaN without return_sign (value and gradients, jax.nn's
  # value too); with it, log|s| and sign -1, finite gradients.
  b = jnp.array([1.0, -3.0, 0.0])
  f = lambda a, b, rs: js.logsumexp(a, b=b, return_sign=rs)  # noqa: E731
  assert np.isnan(f(z3, b, False)) and np.isnan(jax.nn.logsumexp(z3, b=b))
  assert np.all(np.isnan(jax.grad(f, (0, 1))(z3, b, False)))
  (lse, sign), vjp = jax.vjp(lambda a, b: f(a, b, True), z3, b)
  chex.assert_trees_all_close((lse, sign), (np.log(2.0), -1.0))
  da, db = vjp((jnp.ones(()), jnp.zeros(())))
  np.testing.assert_allclose(da, [-0.5, 1.5, 0.0], rtol=1e-6)
  np.testing.assert_allclose(db, [-0.5, -0.5, -0.5], rtol=1e-6)
  # Exact cancellation: -inf, sign 0, NaN gradients (a pole of log|s|).
  b = jnp.array([1.0, -1.0, 0.0])
  (lse, sign), vjp = jax.vjp(lambda a, b: f(a, b, True), z3, b)
  assert lse == -np.inf and sign == 0
  assert np.all(np.isnan(jnp.concatenate(vjp((jnp.ones(()),
                                              jnp.zeros(())))))), vjp
  # Empty support (all b = 0): -inf, sign 0, zero gradients.
  (lse, sign), vjp = jax.vjp(lambda a, b: f(a, b, True), z3, jnp.zeros(3))
  assert lse == -np.inf and sign == 0
  np.testing.assert_array_equal(jnp.concatenate(vjp((jnp.ones(()),
                                                     jnp.zeros(())))), 0.0)


# --------------------------------------------------------------------------
# higher order: reverse-over-reverse and forward-over-reverse


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("masked", (False, True))
def test_hessian_and_hvp_recipes_match_reference(name, masked):
  """``jax.hessian`` (forward-over-reverse), ``jacrev(grad)``, grad-of-grad
  and jvp-of-grad HVPs against the float64 reference Hessian."""
  shape = (2, 4)
  where = nonempty_mask(shape, -1) if masked else None
  x = data(shape, scale=1.0).astype(np.float64)
  c = data(out_shape(name, shape, -1), seed=3).astype(np.float64)
  v = data(shape, seed=4).astype(np.float64)
  h = ref.hessian(name, x, c, where)
  hv = np.tensordot(h, v, 2)
  assert np.max(np.abs(h)) > 1e-2

  def f(x):
    out = call(LIB[name], x, -1, where)
    if name == "log_softmax" and masked:
      out = jnp.where(where, out, 0.0)   # -inf at masked entries
    return jnp.sum(c * out)

  @jax.jit
  def second_order(x, v):
    return {
        "hessian": jax.hessian(f)(x),
        "jacrev(grad)": jax.jacrev(jax.grad(f))(x),
        "grad-of-grad": jax.grad(lambda x: jnp.vdot(jax.grad(f)(x), v))(x),
        "jvp-of-grad": jax.jvp(jax.grad(f), (x,), (v,))[1],
    }

  with jax.enable_x64(True):
    xj, vj = jnp.asarray(x), jnp.asarray(v)
    got = second_order(xj, vj)
    with pytest.raises(TypeError, match="forward-mode"):
      jax.jvp(f, (xj,), (vj,))      # forward mode on the function itself
  for k, val in got.items():
    expected = h if val.ndim == 4 else hv
    np.testing.assert_allclose(val, expected, rtol=1e-10, atol=1e-12,
                               err_msg=k)


# --------------------------------------------------------------------------
# properties


DTYPES = (jnp.float32, jnp.float16, jnp.bfloat16)
ELEMENTS = st.one_of(
    st.floats(-20, 20, width=32),
    st.sampled_from([1e-30, -1e-30, 1e30, -1e30, np.inf, -np.inf, np.nan]),
)
# Scale factors: zeros and negatives, no near-cancellation (exact 0 sums
# only), so float32 and float64 agree on the sign of every sum.
B_ELEMENTS = st.sampled_from([0.0, 0.5, 1.0, 2.0, -0.5, -1.0])


def _axis(ndim):
  ints = st.integers(-ndim, ndim - 1) if ndim else st.nothing()
  return st.one_of(
      st.none(), ints,
      st.lists(ints, max_size=ndim, unique_by=lambda a: a % ndim).map(tuple))


def _broadcasting_to(shape, dtype, elements=None):
  """None, or an array of any shape that broadcasts to ``shape``."""
  shapes = hnp.broadcastable_shapes(shape, min_side=0).filter(
      lambda s: np.broadcast_shapes(s, shape) == shape)
  return st.none() | shapes.flatmap(
      lambda s: hnp.arrays(dtype, s, elements=elements))


@st.composite
def primitive_case(draw):
  name = draw(st.sampled_from(NAMES))
  shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0,
                                max_side=4))
  x = draw(hnp.arrays(np.float32, shape, elements=ELEMENTS))
  kw = {"axis": draw(_axis(len(shape))),
        "where": draw(_broadcasting_to(shape, np.bool_))}
  if name == "logsumexp":
    kw["b"] = draw(_broadcasting_to(shape, np.float32, B_ELEMENTS))
    kw["keepdims"] = draw(st.booleans())
    kw["return_sign"] = draw(st.booleans())
  return name, x, kw, draw(st.sampled_from(DTYPES))


def _sum_to(v, shape):
  """Sums ``v`` over the axes along which ``shape`` was broadcast to it."""
  lead = v.ndim - len(shape)
  axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape)
                                    if n == 1 and v.shape[lead + i] != 1)
  with np.errstate(invalid="ignore"):
    return np.sum(v, axis=axes).reshape(shape)


@given(primitive_case())
def test_property_matches_reference(case):
  """Every shape (0- and 1-sized axes too), axis, broadcastable mask (and b),
  dtype and extreme value against the float64 reference: values, the
  gradient with respect to x (and b), NaN and inf in the same places."""
  name, x, kw, dtype = case
  xl = jnp.asarray(x).astype(dtype)   # (jax's cast: no overflow warning)
  x64 = np.asarray(xl.astype(jnp.float32), np.float64)
  b = kw.pop("b", None)
  ref_kw = dict(kw)
  if b is not None:
    b = np.asarray(b, np.float64)      # exact in every dtype
    ref_kw["b"] = b
  expected = REF[name][0](x64, **ref_kw)
  lse = expected[0] if kw.get("return_sign") else expected
  g = np.cos(np.arange(lse.size)).reshape(lse.shape) * 2
  gl = jnp.asarray(g, dtype)

  def run(x, b):
    out, vjp = jax.vjp(lambda x, b: LIB[name](x, b=b, **kw) if b is not None
                       else LIB[name](x, **kw), x, b)
    return out, vjp((gl, jnp.zeros_like(gl)) if kw.get("return_sign")
                    else gl)

  bl = None if b is None else jnp.asarray(b, dtype)
  out, (dx, db) = jax.jit(run)(xl, bl)
  chex.assert_trees_all_equal_dtypes(out, (xl, xl) if kw.get("return_sign")
                                     else xl)
  for o, e in zip(jax.tree.leaves(out),
                  expected if kw.get("return_sign") else [expected],
                  strict=True):
    assert_rounded_close(o, e, dtype, finite_scale(e))
  if name == "logsumexp":
    dexp = ref.logsumexp_vjp(x64, g, **ref_kw)
  else:
    dexp = REF[name][1](x64, g, **ref_kw)
  chex.assert_shape(dx, np.shape(dexp))
  assert_rounded_close(dx, dexp, dtype, finite_scale(dexp))
  if b is not None:
    dbexp = _sum_to(ref.logsumexp_vjp_b(x64, g, **ref_kw), b.shape)
    assert_rounded_close(db, dbexp, dtype, finite_scale(dbexp))
  if name == "softmax":
    axes = ref.normalize_axes(kw["axis"], x.ndim)
    s = np.sum(np.asarray(out, np.float64), axis=axes)
    finite = np.isfinite(s)
    assert np.all((np.abs(s[finite] - 1) < 10 * TOL[dtype][0])
                  | (s[finite] == 0))


@pytest.mark.parametrize(("a", "b"), [
    ([3e4, 3e4], [1.0, 3.0]),           # d/da was [0.25018, 0.74982]
    ([3e4, 3e4, 3e4], [1.0, -0.5, 0.25]),   # a cancelling sum
    ([-7e3, -7e3 - 1.5], [0.1, -0.3]),  # a negative one
    ([1e4, 1e4 - 30.0, 1e4 - 60.0], [2.0**-60, 1.0, 2.0**40]),
])
def test_logsumexp_with_b_keeps_large_a_exact(a, b):
  """A shift of max(a + log|b|) rounded log|b| into a = 3e4 (an ulp of
  2e-3): gradients off by 1e-4 of themselves and 500 times that where
  the terms cancel. Scaling b by a power of 2 is exact."""
  a, b = np.array(a, np.float32), np.array(b, np.float32)
  lse, sign = js.logsumexp(a, b=b, return_sign=True)
  want, want_sign = ref.logsumexp(a, b=b, return_sign=True)
  assert_close(lse, want, jnp.float32)
  assert sign == want_sign
  da, db = jax.grad(lambda a, b: js.logsumexp(a, b=b, return_sign=True)[0],
                    (0, 1))(a, b)
  assert_close(da, ref.logsumexp_vjp(a, 1.0, b=b, return_sign=True),
               jnp.float32)
  assert_close(db, ref.logsumexp_vjp_b(a, 1.0, b=b, return_sign=True),
               jnp.float32)


@pytest.mark.parametrize(("a", "b"), [
    ([0.0, 0.0], [3e38, 3e38]),         # b exp(a - max a) overflowed the sum
    ([0.0, 90.0], [1e10, 1e-29]),       # exp(-90) flushed to 0 before * 1e10
    ([-100.0, 0.0], [1e38, 1.0]),       # 1e38 exp(-100) lost beside 1
    ([0.0, 1.0], [-3e38, 2e38]),        # a negative sum, with return_sign
    ([3e38, -3e38], [1e-30, 1e10]),     # b of a term exp flushes set the scale
    ([0.0, -20.0], [1.0, 1.0]),         # lse = 2.06e-9: log 0.5 + log 2 was 0
    ([0.0, -100.0], [1.0, 3e38]),       # lse = 1.1e-5: was 0.13% off
])
def test_logsumexp_with_far_scales_b(a, b):
  """The terms are scaled by a power of 2 about the largest: every result
  here is a float32 number to its rounding (jax.nn.logsumexp gives inf,
  23.2, 0, ..., 0 and 0), a tiny one included."""
  a, b = np.array(a, np.float32), np.array(b, np.float32)
  lse, sign = js.logsumexp(a, b=b, return_sign=True)
  want, want_sign = ref.logsumexp(a, b=b, return_sign=True)
  assert_close(lse, want, jnp.float32)
  np.testing.assert_allclose(lse, want, rtol=1e-6)   # relative, if tiny
  assert sign == want_sign
  da, db = jax.grad(lambda a, b: js.logsumexp(a, b=b, return_sign=True)[0],
                    (0, 1))(a, b)
  assert_close(da, ref.logsumexp_vjp(a, 1.0, b=b, return_sign=True),
               jnp.float32)
  assert_close(db, ref.logsumexp_vjp_b(a, 1.0, b=b, return_sign=True),
               jnp.float32)
