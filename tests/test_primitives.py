"""softmax, log_softmax, logsumexp: values, gradients, special values."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax._src.ad_checkpoint import saved_residuals
from jax.test_util import check_grads

import jax_softmax as js

NAMES = ("softmax", "log_softmax", "logsumexp")
LIB = {"softmax": js.softmax, "log_softmax": js.log_softmax,
       "logsumexp": js.logsumexp}
REF = {"softmax": (ref.softmax, ref.softmax_vjp),
       "log_softmax": (ref.log_softmax, ref.log_softmax_vjp),
       "logsumexp": (ref.logsumexp, ref.logsumexp_vjp)}
LOW = (jnp.bfloat16, jnp.float16)
# (rtol, atol) for values and gradients computed from inputs of each dtype.
TOL = {jnp.bfloat16: (2e-2, 2e-2), jnp.float16: (3e-3, 3e-3),
       jnp.float32: (1e-5, 1e-6), jnp.float64: (1e-12, 1e-13)}


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


def assert_close(actual, expected, dtype, scale=1.0):
  rtol, atol = TOL[dtype]
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected,
                             rtol=rtol, atol=atol * scale)


CASES = [(-1, True), (0, False), ((0, 2), False), ((1, 2), True)]


# --------------------------------------------------------------------------
# values and gradients: float64 reference, plain autodiff, check_grads


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
def test_only_output_is_saved(name, dtype, masked):
  x = jnp.asarray(data((3, 5)), dtype)
  where = nonempty_mask((3, 5), -1) if masked else None
  res = saved_residuals(lambda x: LIB[name](x, where=where), x)
  assert len(res) == 1, res
  aval, _ = res[0]
  assert aval.shape == x.shape and aval.dtype == x.dtype, res


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
  with pytest.raises(TypeError, match="floating.*int32"):
    fn(jnp.arange(3))
  with pytest.raises(ValueError, match="out of range.*rank 2"):
    fn(jnp.ones((2, 3)), axis=2)
  with pytest.raises(ValueError, match="repeats"):
    fn(jnp.ones((2, 3)), axis=(0, -2))
  with pytest.raises(TypeError, match="boolean.*int32"):
    fn(jnp.ones((2, 3)), axis=-1, where=jnp.ones((2, 3), jnp.int32))
  with pytest.raises(ValueError, match=r"\(4,\).*\(2, 3\)"):
    fn(jnp.ones((2, 3)), axis=-1, where=jnp.ones((4,), bool))


# --------------------------------------------------------------------------
# properties


ELEMENTS = st.one_of(
    st.floats(-20, 20, width=32),
    st.sampled_from([1e30, -1e30, -np.inf]),
)


@st.composite
def primitive_case(draw):
  ndim = draw(st.integers(1, 3))
  shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim,
                              max_size=ndim)))
  x = draw(hnp.arrays(np.float32, shape, elements=ELEMENTS))
  axes = draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim,
                       unique=True))
  axis = axes[0] - ndim if len(axes) == 1 else tuple(axes)
  mask_kind = draw(st.sampled_from(["none", "full", "broadcast", "empty"]))
  where = None
  if mask_kind == "full":
    where = draw(hnp.arrays(np.bool_, shape))
  elif mask_kind == "broadcast":
    where = draw(hnp.arrays(np.bool_, shape[-1:]))
  elif mask_kind == "empty":
    where = np.zeros(shape, bool)
  g = draw(hnp.arrays(np.float32, shape, elements=st.floats(-2, 2,
                                                             width=32)))
  return x, axis, where, g


@given(primitive_case(), st.sampled_from(NAMES))
def test_property_matches_reference(case, name):
  x, axis, where, g = case
  if name == "logsumexp":
    axes = ref.normalize_axes(axis, x.ndim)
    g = np.sum(g, axis=axes)
  out, dx = vjp_of(name, x, g, axis, where, jit=True)
  fref, vref = REF[name]
  expected = fref(x, axis, where=where)
  dexpected = vref(x, g, axis, where=where)
  np.testing.assert_allclose(out, expected, rtol=2e-6, atol=1e-6)
  np.testing.assert_allclose(dx, dexpected, rtol=1e-5, atol=1e-5)
  assert not np.any(np.isnan(out)) and not np.any(np.isnan(dx))
  if name == "softmax":
    s = np.sum(out, axis=ref.normalize_axes(axis, x.ndim))
    assert np.all((np.abs(s - 1) < 1e-5) | (s == 0))
