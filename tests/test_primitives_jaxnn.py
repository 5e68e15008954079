"""jax's own tests of softmax, log_softmax and logsumexp, run on ours.

The cases of jax's ``tests/nn_test.py`` (softmax, log_softmax) and the
logsumexp cases of ``tests/lax_scipy_test.py``, rewritten in this suite's
style: values against ``scipy.special.logsumexp`` (float64) and ``jax.nn``,
gradients against ``jax.grad`` of ``jax.nn`` wherever ``jax.nn``'s value is
finite (and, for ``b``, where ``b != 0``: jax-ml/jax#22398). Many cases of
one dtype share one ``jit`` (one compilation), to keep the file fast; for
the same reason gradients are compared with ``jax.nn``'s in float32 only
(half-precision gradients are checked against the float64 reference in
``test_primitives.py``, the property test included).
"""

import itertools
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
import scipy.special as osp_special
from helpers import as_float64, assert_float32_close, saved_residuals
from jax.test_util import check_grads

import jax_softmax as js

FLOATS = (jnp.float16, jnp.bfloat16, jnp.float32)
# Results are compared with helpers.assert_float32_close (JAX_NN_TOL).


def _rand(rng, shape, dtype):
  """jax's ``rand_default``: normal with scale 3 (small integers for ints)."""
  if dtype == jnp.int32:
    return jnp.asarray(rng.integers(-5, 6, shape), dtype)
  return jnp.asarray(3 * rng.standard_normal(shape)).astype(dtype)


def _value_and_vjp(fn, args, ct):
  out, vjp = jax.vjp(fn, *args)
  return out, vjp(ct)


# --------------------------------------------------------------------------
# lax_scipy_test: testLogSumExp


COMPATIBLE = [[(), ()], [(4,), (3, 4)], [(3, 1), (1, 4)],
              [(2, 3, 4), (2, 1, 4)]]


def _lse_cases():
  """``(a_shape, b_shape or None, axis, keepdims, return_sign)``: every shape
  pair of the jax test, each with one of its axes (``None`` included) and
  one of the four flag pairs, in turn (period 5, so that every slice of
  DTYPE_CASES sees all four)."""
  cases = []
  for group in COMPATIBLE:
    for use_b in (False, True):
      for shapes in itertools.product(*((group, group) if use_b
                                        else (group,))):
        nd = max(len(s) for s in shapes)
        i = len(cases)
        axes = [*range(-nd, nd), None]
        cases.append((shapes[0], shapes[1] if use_b else None,
                      axes[i % len(axes)], bool(i % 5 % 2),
                      bool(i % 5 // 2 % 2)))
  return cases


LSE_CASES = _lse_cases()
# Each dtype compiles its own program: to keep the file fast, float32 and
# int32 run every other case, float16 and bfloat16 a third each (each dtype:
# every shape group with and without b, every keepdims / return_sign pair).
DTYPE_CASES = {jnp.float32: LSE_CASES[1::2], jnp.int32: LSE_CASES[::2],
               jnp.float16: LSE_CASES[::3], jnp.bfloat16: LSE_CASES[1::3]}


def _scipy_lse(a, b, axis, keepdims, return_sign):
  with warnings.catch_warnings():   # log of a negative sum: NaN
    warnings.simplefilter("ignore", RuntimeWarning)
    return osp_special.logsumexp(a, axis, b=b, keepdims=keepdims,
                                 return_sign=return_sign)


def _finite_max(v, initial=1.0):
  v = np.abs(np.asarray(np.asarray(v).astype(np.float32), np.float64))
  return float(np.max(v[np.isfinite(v)], initial=initial))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", FLOATS + (jnp.int32,))
def test_logsumexp_against_scipy_and_jax_nn(dtype):
  """Values against scipy (float64) and jax.nn; for float32, d/da and d/db
  against jax.grad of jax.nn where its value is finite (and b != 0)."""
  rng = np.random.default_rng(0)
  cases = DTYPE_CASES[dtype]
  inputs = [(_rand(rng, sa, dtype), None if sb is None else
             _rand(rng, sb, dtype)) for sa, sb, *_ in cases]
  grads = dtype == jnp.float32   # (see the module docstring)

  def run(inputs):
    out = []
    for (a, b), (_, _, axis, keepdims, rs) in zip(inputs, cases,
                                                  strict=True):
      kw = {"axis": axis, "keepdims": keepdims, "return_sign": rs}
      pair = []
      for lse in (js.logsumexp, jax.nn.logsumexp):
        def f(a, b, lse=lse, kw=kw):
          with jax.numpy_rank_promotion("allow"):
            return lse(a, b=b, **kw)
        if not grads:
          pair.append((f(a, b), None))
          continue
        primal = f(a, b)
        v = primal[0] if rs else primal
        g = jnp.cos(jnp.arange(v.size, dtype=v.dtype)).reshape(v.shape)
        pair.append(_value_and_vjp(f, (a, b), (g, jnp.zeros_like(g)) if rs
                                   else g))
      out.append(pair)
    return out

  for (a, b), case, ((ours, dours), (theirs, dtheirs)) in zip(
      inputs, cases, jax.jit(run)(inputs), strict=True):
    msg = f"case {case}"
    _, _, axis, keepdims, rs = case
    expected = _scipy_lse(as_float64(a),
                          None if b is None else as_float64(b), axis,
                          keepdims, rs)
    chex.assert_trees_all_equal_shapes_and_dtypes(ours, theirs)
    chex.assert_type(jax.tree.leaves(ours),
                     jnp.float32 if dtype == jnp.int32 else dtype)
    for o, t, e in zip(*(jax.tree.leaves(v) for v in (ours, theirs,
                                                      expected)),
                       strict=True):
      assert_float32_close(o, e, dtype, _finite_max(e), msg=msg)
      assert_float32_close(o, t, dtype, _finite_max(e), msg=msg)
    if not grads:
      continue
    (da, db), (tda, tdb) = dours, dtheirs
    lse = np.asarray(jax.tree.leaves(theirs)[0].astype(jnp.float32))
    shape = a.shape if b is None else np.broadcast_shapes(a.shape, b.shape)
    if not keepdims:
      lse = np.expand_dims(lse, ref.normalize_axes(axis, len(shape)))
    ok = np.broadcast_to(np.isfinite(lse), shape)
    scale = _finite_max(tda)
    assert_float32_close(da, tda, dtype, scale,
                         where=_all_to(ok, a.shape), msg=f"d/da, {msg}")
    if b is not None:
      okb = _all_to(ok, b.shape) & (np.asarray(b, np.float32) != 0)
      assert_float32_close(db, tdb, dtype, scale, where=okb,
                           msg=f"d/db, {msg}")


def _all_to(mask, shape):
  """``mask`` reduced with ``all`` over the axes ``shape`` broadcasts along
  (an input's gradient sums over them)."""
  lead = mask.ndim - len(shape)
  axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape)
                                    if n == 1 and mask.shape[lead + i] != 1)
  return np.all(mask, axis=axes).reshape(shape)


# --------------------------------------------------------------------------
# lax_scipy_test: the regression tests


def test_logsumexp_zeros():
  # jax-ml/jax#5370: b = 0 drops its entry (integer inputs).
  a, b = np.array([-1000, -2]), np.array([1, 0])
  out = js.logsumexp(a, b=b)
  chex.assert_type(out, jnp.float32)
  np.testing.assert_allclose(out, osp_special.logsumexp(a, b=b), rtol=1e-7)
  np.testing.assert_allclose(out, jax.jit(js.logsumexp)(a, b=b), rtol=0)


def test_logsumexp_ones_under_debug_infs():
  # jax-ml/jax#7390.
  x = np.ones(4, np.float32)
  with jax.debug_infs(True):
    for fn in (js.logsumexp, jax.jit(js.logsumexp)):
      np.testing.assert_allclose(fn(x), osp_special.logsumexp(x), rtol=1e-6)


def test_logsumexp_scalars_under_debug_nans_without_jit():
  # jax-ml/jax#7634.
  with jax.debug_nans(True), jax.disable_jit():
    assert js.logsumexp(1.0) == 1.0
    assert js.logsumexp(1.0, b=1.0) == 1.0


@pytest.mark.parametrize("dtype", FLOATS)
def test_logsumexp_where(dtype):
  rng = np.random.default_rng(2)
  xs = [_rand(rng, (n,), dtype) for n in range(6)]
  masks = [rng.random(n) < 0.5 for n in range(6)]
  outs = jax.jit(lambda xs, ms: [js.logsumexp(x, where=m)
                                 for x, m in zip(xs, ms, strict=True)])(
                                     xs, masks)
  for x, mask, out in zip(xs, masks, outs, strict=True):
    expected = (osp_special.logsumexp(as_float64(x)[mask]) if mask.any()
                else -np.inf)
    assert_float32_close(out, expected, dtype, _finite_max(expected),
                         msg=f"{mask}")


def test_logsumexp_where_grad():
  x = jnp.array([0.0, 0.0, 0.0, 0.0, 100.0])
  g = jax.grad(lambda x: js.logsumexp(x, where=jnp.arange(5) < 4))(x)
  np.testing.assert_allclose(g, [0.25, 0.25, 0.25, 0.25, 0.0], rtol=1e-6)


# --------------------------------------------------------------------------
# nn_test: softmax and log_softmax


FNS = {"softmax": (js.softmax, jax.nn.softmax),
       "log_softmax": (js.log_softmax, jax.nn.log_softmax)}


@pytest.mark.parametrize("name", FNS)
def test_softmax_empty_array(name):
  x = jnp.array([], dtype=float)
  out = FNS[name][0](x)
  chex.assert_trees_all_equal_shapes_and_dtypes(out, x)


@pytest.mark.parametrize("name", FNS)
def test_softmax_empty_mask(name):
  x = jnp.array([5.5, 1.3, -4.2, 0.9])
  m = jnp.zeros_like(x, dtype=bool)
  expected = np.full(4, 0.0 if name == "softmax" else -np.inf)
  np.testing.assert_array_equal(FNS[name][0](x, where=m), expected)
  np.testing.assert_array_equal(FNS[name][1](x, where=m), expected)


@pytest.mark.parametrize("name", FNS)
def test_softmax_where_mask(name):
  fn = FNS[name][0]
  x = jnp.array([5.5, 1.3, -4.2, 0.9])
  m = jnp.array([True, False, True, True])
  out = fn(x, where=m)
  np.testing.assert_allclose(out[m], fn(x[m]), rtol=1e-6)
  probs = out if name == "softmax" else jnp.exp(out)
  np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-6)
  # jax checks softmax to second order here (forward mode too); ours are
  # reverse mode, to second order (in float64), for both functions.
  with jax.enable_x64(True):
    check_grads(jax.jit(lambda x: jnp.take(fn(x, where=m),
                                           jnp.array([0, 2, 3]))),
                (x.astype(jnp.float64),), order=2, modes=["rev"])


@pytest.mark.parametrize("name", FNS)
def test_softmax_where_grad(name):
  # jax-ml/jax#19490: a huge masked entry does not leak into the gradient.
  x = jnp.array([36.0, 10000.0])
  mask = x < 1000
  g = jax.grad(lambda x: FNS[name][0](x, where=mask)[0])(x)
  np.testing.assert_array_equal(g, [0.0, 0.0])


@pytest.mark.parametrize("name", FNS)
def test_softmax_grad(name):
  # (In float64: float32 finite differences of log_softmax miss jax's
  # atol=5e-3, which is why jax checks softmax only.)
  with jax.enable_x64(True):
    x = jnp.array([5.5, 1.3, -4.2, 0.9], jnp.float64)
    check_grads(jax.jit(FNS[name][0]), (x,), order=2, modes=["rev"])


@pytest.mark.parametrize("name", FNS)
def test_softmax_grad_residuals(name):
  x = jnp.array([5.5, 1.3, -4.2, 0.9])
  res = saved_residuals(FNS[name][0], x)
  assert len(res) == 1 and res[0].size == 4, [r.shape for r in res]


# Shapes and axes (negative, tuples, None, none at all) and masks of several
# broadcast shapes, against jax.nn, values and gradients.
AXES_CASES = [((2, 3, 4), 0, None), ((2, 3, 4), -1, (4,)),
              ((2, 3, 4), (0, 2), (3, 1)), ((2, 3, 4), (-1, -3), (2, 1, 4)),
              ((3, 4), None, (3, 1)), ((3, 1), (), None)]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", FLOATS)
def test_softmax_axes_and_masks_against_jax_nn(dtype):
  rng = np.random.default_rng(3)
  cases = AXES_CASES
  inputs = []
  for shape, _, mshape in cases:
    mask = None if mshape is None else rng.random(mshape) < 0.7
    inputs.append((_rand(rng, shape, dtype), mask))

  grads = dtype == jnp.float32   # (see the module docstring)

  def run(xs):
    out = []
    for x, (_, axis, _), (_, mask) in zip(xs, cases, inputs, strict=True):
      g = jnp.cos(jnp.arange(x.size, dtype=x.dtype)).reshape(x.shape)
      for ours, theirs in FNS.values():
        pair = []
        for fn in (ours, theirs):
          def f(x, fn=fn, axis=axis, mask=mask):
            with jax.numpy_rank_promotion("allow"):
              return fn(x, axis=axis, where=mask)
          pair.append(_value_and_vjp(f, (x,), g) if grads else (f(x), None))
        out.append(pair)
    return out

  results = jax.jit(run)([x for x, _ in inputs])
  names = [(case, name) for case in cases for name in FNS]
  for (case, name), ((out, dx), (tout, tdx)) in zip(names, results,
                                                    strict=True):
    msg = f"{name} case {case}"
    chex.assert_trees_all_equal_shapes_and_dtypes(out, tout)
    scale = 1.0 if name == "softmax" else _finite_max(tout)
    assert_float32_close(out, tout, dtype, scale, msg=msg)
    if grads:
      # Gradients where jax.nn's are finite (not on all-masked slices).
      (dx,), (tdx,) = dx, tdx
      assert_float32_close(dx, tdx, dtype, scale,
                           where=np.isfinite(np.asarray(tdx, np.float32)),
                           msg=msg)
