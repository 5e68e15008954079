"""optax's own test cases for the two drop-ins, case by case.

The cases of ``optax/losses/_classification_test.py`` (optax 0.2.8 and
its main branch): ``SoftmaxCrossEntropyTest``,
``SafeSoftmaxCrossEntropyTest``, ``SoftmaxCrossEntropyWithIntegerLabelsTest``
and ``PolyLossTest.test_equals_to_cross_entropy_when_eps0`` (which checks
against ``softmax_cross_entropy``), re-expressed: each case runs
jax_softmax's function and optax's on the same inputs and compares values
and gradients (w.r.t. logits, and w.r.t. labels for the probability
version), plus optax's expected values and a float64 NumPy expectation.
Where jax_softmax documents a departure from optax (docs/numerics.md,
"Departures from optax") the case asserts jax_softmax's documented
behaviour instead and names the departure. The last section covers the
drop-in claims that optax's tests leave out (vmap, one-hot integer labels,
broadcastable labels, row masks, tuple axes of the probability version).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import optax
import pytest

import jax_softmax as js

JS_PROB = js.softmax_cross_entropy
JS_INT = js.softmax_cross_entropy_with_integer_labels
OX_PROB = optax.softmax_cross_entropy
OX_INT = optax.softmax_cross_entropy_with_integer_labels

# optax's setUp data (both classes share the logits).
YS = np.array([[10.0, 1.0, -2.0], [1.0, 4.0, 0.2]], np.float32)
TS = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], np.float32)
TS_INT = np.array([1, 0], np.int32)
EXP = np.array([9.00013, 3.0696733], np.float32)
ROW_MASK = np.array([True, False])
PER_LOGIT_MASK = np.array([[1, 0, 0], [0, 0, 0]]).astype(bool)

# SafeSoftmaxCrossEntropyTest's data: -inf logits.
SAFE_YS = np.array([[10.0, 1.0, -2.0], [1.0, 4.0, 0.2], [-np.inf, 0.0, 0.0],
                    [-np.inf, 0.0, 0.0], [-np.inf, 0.0, -np.inf]], np.float32)
SAFE_TS = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.5, 0.5],
                    [0.4, 0.3, 0.3], [0.0, 1.0, 0.0]], np.float32)
SAFE_EXP = np.array([9.00013, 3.0696733, 0.693147, np.inf, 0.0], np.float32)


# --------------------------------------------------------------------------
# float64 NumPy expectations


def _rows64(x, axis):
  """``x`` in float64 as ``(*batch, classes)``: the class axes (an int or a
  tuple, flattened in the order given, as optax does) moved last."""
  x = np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  axes = tuple(a % x.ndim for a in axes)
  batch = tuple(a for a in range(x.ndim) if a not in axes)
  x = x.transpose(batch + axes)
  return x.reshape(x.shape[:len(batch)] + (-1,))


def _log_softmax64(z):
  with np.errstate(invalid="ignore"):
    m = np.max(z, axis=-1, keepdims=True)
    s = z - m
    return s - np.log(np.sum(np.exp(s), axis=-1, keepdims=True))


def np_prob(logits, labels, axis=-1):
  """``-sum_c t_c log p_c`` in float64, a zero target term 0 (even where
  ``log p_c`` is ``-inf``)."""
  z = _rows64(logits, axis)
  t = _rows64(np.broadcast_to(labels, np.shape(logits)), axis)
  lp = _log_softmax64(z)
  with np.errstate(invalid="ignore"):
    return -np.sum(np.where(t == 0, 0.0, t * lp), axis=-1)


def np_int(logits, labels, axis=-1):
  """``-log p_y`` in float64."""
  lp = _log_softmax64(_rows64(logits, axis))
  y = np.asarray(labels)[..., None]
  return -np.take_along_axis(lp, y, axis=-1)[..., 0]


# --------------------------------------------------------------------------
# comparisons


def _cotangent(shape, seed=0):
  """Distinct per-row weights, so a gradient mixed up across rows shows."""
  return jnp.asarray(np.random.default_rng(seed).uniform(0.5, 1.5, shape),
                     jnp.float32)


@functools.partial(jax.jit, static_argnames=("fn", "wrt_labels", "axis"))
def _value_and_grads(fn, logits, labels, wrt_labels, axis=-1, where=None):
  """``fn``'s value and the gradients of ``sum(w * fn(logits, labels))``
  w.r.t. the logits (and the labels), in one compiled call."""
  def f(z, t):
    kw = {} if axis == -1 and where is None else {"axis": axis,
                                                  "where": where}
    out = fn(z, t, **kw)
    w = _cotangent(out.shape)
    return jnp.sum(w * out.astype(jnp.float32)), out

  argnums = (0, 1) if wrt_labels else 0
  g, out = jax.grad(f, argnums=argnums, has_aux=True)(logits, labels)
  return out, g


def _grads(fn, logits, labels, wrt_labels, **kw):
  return _value_and_grads(fn, jnp.asarray(logits), jnp.asarray(labels),
                          wrt_labels, **kw)[1]


def assert_matches_optax(ours, theirs, logits, labels, *, atol=1e-6,
                         rtol=1e-6, off=None, **kw):
  """Same values (shape and dtype) and gradients as optax's function.

  ``off``: where probability labels leave the loss (masked classes or
  rows), broadcast to the labels' shape; the label gradient there is
  exactly 0 for us and NaN for optax (``0 * log p`` of a masked entry, a
  non-finite optax result, so no departure), and is compared elsewhere.
  """
  wrt_labels = jnp.issubdtype(jnp.asarray(labels).dtype, jnp.floating)
  logits, labels = jnp.asarray(logits), jnp.asarray(labels)
  got, g = _value_and_grads(ours, logits, labels, wrt_labels, **kw)
  want, g_ox = _value_and_grads(theirs, logits, labels, wrt_labels, **kw)
  chex.assert_equal_shape((got, want))
  chex.assert_trees_all_equal_dtypes(got, want)
  chex.assert_trees_all_close(got, want, atol=atol, rtol=rtol)
  if wrt_labels:
    (g, dt), (g_ox, dt_ox) = g, g_ox
    off = np.zeros(dt.shape, bool) if off is None else np.broadcast_to(
        off, dt.shape)
    np.testing.assert_array_equal(dt[off], 0.0)
    assert np.isnan(dt_ox[off]).all()
    np.testing.assert_allclose(dt[~off], dt_ox[~off], atol=atol, rtol=rtol)
  chex.assert_trees_all_close(g, g_ox, atol=atol, rtol=rtol)
  return got


def _check_grads(fn, args):
  # Reverse mode only: the drop-ins are custom_vjps (forward mode of the
  # loss itself is not supported, docs/numerics.md).
  jax.test_util.check_grads(fn, args, order=1, modes=["rev"])


# --------------------------------------------------------------------------
# SoftmaxCrossEntropyTest


def test_prob_scalar():
  """``test_scalar``: one unbatched row, under jit."""
  got = jax.jit(JS_PROB)(YS[0], TS[0])
  chex.assert_shape(got, ())
  np.testing.assert_allclose(got, EXP[0], atol=1e-4)
  np.testing.assert_allclose(got, np_prob(YS[0], TS[0]), rtol=1e-6)
  assert_matches_optax(JS_PROB, OX_PROB, YS[0], TS[0])


def test_prob_batched():
  """``test_batched``."""
  got = jax.jit(JS_PROB)(YS, TS)
  np.testing.assert_allclose(got, EXP, atol=1e-4)
  np.testing.assert_allclose(got, np_prob(YS, TS), rtol=1e-6)
  assert_matches_optax(JS_PROB, OX_PROB, YS, TS)


def test_prob_per_logit_mask():
  """``test_per_logit_mask``: a row with every class masked gives 0; row 0
  keeps class 0 only, which holds no target mass (0 too)."""
  out = JS_PROB(YS, TS, where=PER_LOGIT_MASK)
  np.testing.assert_array_equal(
      jnp.where(jnp.any(PER_LOGIT_MASK, -1), 0.0, out), 0.0)
  np.testing.assert_array_equal(out, OX_PROB(YS, TS, where=PER_LOGIT_MASK))
  dz, dt = _grads(JS_PROB, YS, TS, True, where=PER_LOGIT_MASK)
  chex.assert_trees_all_close(
      dz, _grads(OX_PROB, YS, TS, False, where=PER_LOGIT_MASK), atol=1e-7)
  # The loss does not depend on masked labels: their gradient is exactly 0
  # (optax's is NaN there, 0 * log p of a masked class; not a documented
  # departure, optax's result is not finite).
  np.testing.assert_array_equal(dt, 0.0)
  ox_dt = _grads(OX_PROB, YS, TS, True, where=PER_LOGIT_MASK)[1]
  np.testing.assert_array_equal(np.isnan(ox_dt), ~PER_LOGIT_MASK)


def test_prob_gradient():
  """``test_gradient``: numerical gradients w.r.t. logits and labels, then
  finite gradients under a row mask."""
  _check_grads(JS_PROB, (YS, TS))
  dz = _grads(JS_PROB, YS, TS, False, where=ROW_MASK)
  chex.assert_tree_all_finite(dz)
  np.testing.assert_array_equal(dz[1], 0.0)   # the masked row
  assert_matches_optax(JS_PROB, OX_PROB, YS, TS, where=ROW_MASK,
                       off=~ROW_MASK[:, None])


@pytest.mark.parametrize("size", (5, 10))
def test_prob_mask(size):
  """``test_mask``: a 1-D class mask equals dropping the masked classes."""
  rng = np.random.default_rng(size)
  preds = rng.normal(size=size).astype(np.float32)
  targets = rng.dirichlet(np.ones(size)).astype(np.float32)
  mask = rng.integers(2, size=size).astype(bool)
  assert mask.any() and not mask.all()
  x = JS_PROB(preds[mask], targets[mask])
  y = JS_PROB(preds, targets, where=mask)
  np.testing.assert_allclose(x, y, atol=1e-6)
  np.testing.assert_allclose(y, np_prob(preds[mask], targets[mask]),
                             rtol=1e-6)
  np.testing.assert_allclose(y, OX_PROB(preds, targets, where=mask),
                             rtol=1e-6)
  dz, dt = _grads(JS_PROB, preds, targets, True, where=mask)
  ox_dz, ox_dt = _grads(OX_PROB, preds, targets, True, where=mask)
  np.testing.assert_allclose(dz, ox_dz, atol=1e-6)
  # Labels: optax's gradient is NaN on masked classes, ours exactly 0.
  np.testing.assert_allclose(dt[mask], ox_dt[mask], rtol=1e-6)
  np.testing.assert_array_equal(dt[~mask], 0.0)
  sub_dz, sub_dt = _grads(JS_PROB, preds[mask], targets[mask], True)
  np.testing.assert_allclose(dz[mask], sub_dz, atol=1e-6)
  np.testing.assert_allclose(dt[mask], sub_dt, rtol=1e-6)


@pytest.mark.parametrize("axis", (0, 1, 2))
def test_prob_axis(axis):
  """``test_axis``: the class axis moved last gives the same loss."""
  shape = (4, 5, 6)
  rng = np.random.default_rng(axis)
  preds = rng.normal(size=shape).astype(np.float32)
  targets = rng.dirichlet(np.ones(shape[-1]), size=shape[:-1])
  targets = targets.astype(np.float32)
  x = assert_matches_optax(JS_PROB, OX_PROB, preds, targets, axis=axis,
                           rtol=1e-5)
  y = np_prob(np.moveaxis(preds, axis, -1), np.moveaxis(targets, axis, -1))
  np.testing.assert_allclose(x, y, rtol=1e-5)


# --------------------------------------------------------------------------
# SafeSoftmaxCrossEntropyTest: -inf logits


def test_safe_batched_and_scalar():
  """``test_scalar``, ``test_batched``: jax_softmax's drop-in gives
  ``safe_softmax_cross_entropy``'s expected values.

  Departure (documented): ``-inf`` logits on classes with zero target mass
  give a finite loss (rows 2 and 4); ``optax.softmax_cross_entropy`` gives
  NaN there. Target mass on a ``-inf`` logit (row 3) is ``+inf`` in both.
  """
  np.testing.assert_allclose(jax.jit(JS_PROB)(SAFE_YS[0], SAFE_TS[0]),
                             SAFE_EXP[0], atol=1e-4)
  got = jax.jit(JS_PROB)(SAFE_YS, SAFE_TS)
  np.testing.assert_allclose(got, SAFE_EXP, atol=1e-4)
  np.testing.assert_allclose(got, np_prob(SAFE_YS, SAFE_TS), rtol=1e-6)
  plain = OX_PROB(SAFE_YS, SAFE_TS)
  np.testing.assert_array_equal(np.isnan(plain), [0, 0, 1, 0, 1])
  np.testing.assert_allclose(
      got, optax.safe_softmax_cross_entropy(SAFE_YS, SAFE_TS), atol=1e-6)


def test_safe_gradients():
  """``test_gradient`` (numerical, the finite rows) and the gradients on
  the ``-inf`` rows: w.r.t. logits those of
  ``safe_softmax_cross_entropy`` (0 on ``-inf`` logits without target
  mass, finite where the loss is ``+inf``)."""
  _check_grads(JS_PROB, (SAFE_YS[:2], SAFE_TS[:2]))
  dz, dt = _grads(JS_PROB, SAFE_YS, SAFE_TS, True)
  safe_dz, safe_dt = _grads(optax.safe_softmax_cross_entropy, SAFE_YS,
                            SAFE_TS, True)
  chex.assert_tree_all_finite((dz, dt))
  np.testing.assert_allclose(dz, safe_dz, atol=1e-6)
  np.testing.assert_array_equal(
      dz[np.isneginf(SAFE_YS) & (SAFE_TS == 0)], 0.0)
  # Labels: -log p_c where the logit is finite; optax's is +inf on -inf
  # logits (not finite), ours 0: a -inf class is off the support, whose
  # target gradient cross_entropy documents as 0.
  # Both against the float64 -w log p; optax's float32 log(1 + 1.3e-4) on
  # the confident row 0 rounds at 2e-4 relative, ours (log1p) does not.
  finite = np.isfinite(SAFE_YS)
  w = np.asarray(_cotangent(SAFE_YS.shape[:1]), np.float64)[:, None]
  want = -w * _log_softmax64(_rows64(SAFE_YS, -1))
  np.testing.assert_allclose(dt[finite], want[finite], rtol=1e-6)
  np.testing.assert_allclose(safe_dt[finite], want[finite], rtol=1e-3)
  np.testing.assert_array_equal(np.isinf(safe_dt), ~finite)
  np.testing.assert_array_equal(dt[~finite], 0.0)


def test_safe_against_plain_implementation():
  """``test_against_plain_implementation``: on a finite row, the value and
  gradients equal plain optax's (and the safe one's)."""
  for theirs in (OX_PROB, optax.safe_softmax_cross_entropy):
    assert_matches_optax(JS_PROB, theirs, SAFE_YS[0], SAFE_TS[0], atol=1e-4)


# --------------------------------------------------------------------------
# SoftmaxCrossEntropyWithIntegerLabelsTest


@pytest.mark.parametrize("batched", (False, True))
def test_int_consistent_with_softmax_cross_entropy(batched):
  """``test_consistent_with_softmax_cross_entropy_scalar`` and
  ``..._batched``: integer labels equal their one-hot rows."""
  ys, ts = (YS, TS_INT) if batched else (YS[0], TS_INT[0])
  want = JS_PROB(ys, jax.nn.one_hot(ts, 3))
  got = jax.jit(JS_INT)(ys, ts)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(got, np_int(ys, ts), rtol=1e-6)
  np.testing.assert_allclose(got, OX_PROB(ys, jax.nn.one_hot(ts, 3)),
                             rtol=1e-6)
  assert_matches_optax(JS_INT, OX_INT, ys, ts)


def test_int_gradient():
  """``test_gradient``: numerical gradient w.r.t. logits, then finite
  gradients under a row mask."""
  _check_grads(functools.partial(JS_INT, labels=TS_INT), (YS,))
  dz = _grads(JS_INT, YS, TS_INT, False, where=ROW_MASK)
  chex.assert_tree_all_finite(dz)
  np.testing.assert_array_equal(dz[1], 0.0)
  assert_matches_optax(JS_INT, OX_INT, YS, TS_INT, where=ROW_MASK)


def test_int_per_logit_mask():
  """``test_per_logit_mask``: an all-masked row gives 0; row 0's target
  (class 1) is masked and scored by its raw logit, ``lse over {0} - z_1``
  = 9, as optax does (its gradient ``p - onehot(y)`` reaches it)."""
  out = assert_matches_optax(JS_INT, OX_INT, YS, TS_INT, where=PER_LOGIT_MASK)
  np.testing.assert_array_equal(
      jnp.where(jnp.any(PER_LOGIT_MASK, -1), 0.0, out), 0.0)
  np.testing.assert_allclose(out, [9.0, 0.0], rtol=1e-6)
  np.testing.assert_allclose(
      _grads(JS_INT, YS, TS_INT, False, where=PER_LOGIT_MASK),
      np.array([[1.0, -1.0, 0.0], [0.0, 0.0, 0.0]]) * np.asarray(
          _cotangent((2,)))[:, None], rtol=1e-6)


@pytest.mark.parametrize("axis", (0, 1, 2))
def test_int_axis(axis):
  """``test_axis``: labels of the batch shape, the class axis anywhere."""
  shape = (4, 5, 6)
  rng = np.random.default_rng(10 + axis)
  preds = rng.normal(size=shape).astype(np.float32)
  targets = rng.integers(shape[axis], size=shape[:axis] + shape[axis + 1:])
  targets = targets.astype(np.int32)
  x = assert_matches_optax(JS_INT, OX_INT, preds, targets, axis=axis,
                           rtol=1e-5)
  y = np_int(np.moveaxis(preds, axis, -1), targets)
  np.testing.assert_allclose(x, y, rtol=1e-5)


AXES = ((1, 3), (3, 2), (2, 3), (-3, -1), (-1, -2), (-2, -1), (0, 1, 3),
        (-4, -3, -1))


def _layout(flat, axis, shape):
  """``(*batch, C)`` rows laid out as ``shape`` with the class axes
  ``axis`` (a flat class index runs over them in the order given)."""
  ndim = len(shape)
  logits_axis = tuple(a % ndim for a in axis)
  labels_axis = tuple(a for a in range(ndim) if a not in logits_axis)
  perm = labels_axis + logits_axis
  out = flat.reshape(tuple(shape[a] for a in perm)).transpose(
      np.argsort(perm))
  assert out.shape == shape
  return out


def _axes_case(axis, shape=(2, 3, 4, 5)):
  """``test_axes``'s inputs: flat ``(*batch, C)`` logits and labels in
  ``[0, C - 1)``, and the same logits laid out as ``shape``."""
  ndim = len(shape)
  logits_axis = tuple(a % ndim for a in axis)
  labels_shape = tuple(shape[a] for a in range(ndim) if a not in logits_axis)
  classes = int(np.prod([shape[a] for a in logits_axis]))
  k_logits, k_labels = jax.random.split(jax.random.key(42))
  flat = jax.random.uniform(k_logits, labels_shape + (classes,))
  labels = jax.random.randint(k_labels, labels_shape, 0, classes - 1)
  return flat, _layout(flat, axis, shape), labels, classes


@pytest.mark.parametrize("axis", AXES)
def test_int_axes(axis):
  """``test_axes``: a tuple ``axis`` flattens those axes into one."""
  flat, logits, labels, _ = _axes_case(axis)
  actual = assert_matches_optax(JS_INT, OX_INT, logits, labels, axis=axis)
  np.testing.assert_allclose(actual, np_int(flat, labels), rtol=1e-6)


# --------------------------------------------------------------------------
# PolyLossTest.test_equals_to_cross_entropy_when_eps0: its
# softmax_cross_entropy inputs


POLY_CASES = (
    ([[4.0, 2.0, 1.0], [0.0, 5.0, 1.0], [0.134, 1.234, 3.235]],
     [[1.0, 0.0, 0.0], [0.0, 0.8, 0.2], [0.34, 0.33, 0.33]]),
    ([[4.0, 2.0, 1.0], [0.0, 5.0, 1.0]], [[1.0, 0.0, 0.0], [0.0, 0.8, 0.2]]),
    ([[4.0, 2.0, 1.0, 0.134, 1.3515], [0.0, 5.0, 1.0, 0.5215, 5.616]],
     [[0.5, 0.0, 0.0, 0.0, 0.5], [0.0, 0.12, 0.2, 0.56, 0.12]]),
    ([1.89, 2.39], [0.34, 0.66]),
    ([0.314], [1.0]),
)


@pytest.mark.parametrize("logits,labels", POLY_CASES)
def test_prob_poly_loss_cases(logits, labels):
  """The eps = 0 poly loss is ``softmax_cross_entropy``: its inputs (one
  class included) give optax's values and gradients and the float64
  ones."""
  logits = np.asarray(logits, np.float32)
  labels = np.asarray(labels, np.float32)
  got = assert_matches_optax(JS_PROB, OX_PROB, logits,
                             labels)
  np.testing.assert_allclose(got, np_prob(logits, labels), rtol=1e-6,
                             atol=1e-7)
  np.testing.assert_allclose(
      got, optax.losses.poly_loss_cross_entropy(logits, labels, epsilon=0.0),
      atol=1e-4)


# --------------------------------------------------------------------------
# documented departures, on optax's inputs


def test_departure_out_of_range_labels_give_nan():
  """Departure (documented): a label outside ``[0, classes)`` gives NaN for
  its row; optax wraps a negative label (-1 scores class 2). Concrete
  labels raise ``ValueError`` eagerly (docs/numerics.md, special values)."""
  labels = jnp.array([-1, 0], jnp.int32)
  got = jax.jit(JS_INT)(YS, labels)
  assert np.isnan(got[0])
  np.testing.assert_allclose(got[1], np_int(YS[1], 0), rtol=1e-6)
  np.testing.assert_allclose(OX_INT(YS, labels)[0], np_int(YS[0], 2),
                             rtol=1e-6)   # optax: wrapped
  assert np.isnan(jax.jit(JS_INT)(YS, jnp.array([0, 3], jnp.int32))[1])
  dz = jax.jit(jax.grad(lambda z: JS_INT(z, labels)[1]))(YS)
  chex.assert_tree_all_finite(dz[1])   # the NaN stays in its row
  assert np.isnan(dz[0]).all()
  with pytest.raises(ValueError, match="outside"):
    JS_INT(YS, np.array([0, 3], np.int32))


LOW = ((jnp.bfloat16, 2e-2), (jnp.float16, 3e-3))


@pytest.mark.parametrize("dtype,tol", LOW)
@pytest.mark.parametrize("which", ("prob", "int"))
def test_departure_low_precision_loss_is_float32(dtype, tol, which):
  """Departure (documented): the loss is float32 for bfloat16/float16
  logits (optax: the input dtype), accurate to float32 for the rounded
  logits; the gradient keeps the logits' dtype, as optax's does."""
  ours, theirs, labels, ref = {
      "prob": (JS_PROB, OX_PROB, jnp.asarray(TS, dtype), np_prob),
      "int": (JS_INT, OX_INT, TS_INT, np_int)}[which]
  z = jnp.asarray(YS, dtype)
  got = ours(z, labels)
  assert got.dtype == jnp.float32
  assert theirs(z, labels).dtype == dtype
  np.testing.assert_allclose(got, ref(z, labels), rtol=1e-6)
  np.testing.assert_allclose(got, theirs(z, labels).astype(jnp.float32),
                             rtol=tol, atol=tol)
  wrt = which == "prob"
  g, g_ox = (_grads(f, z, labels, wrt) for f in (ours, theirs))
  chex.assert_trees_all_equal_dtypes(g, g_ox)
  chex.assert_trees_all_close(jax.tree.map(lambda a: a.astype(jnp.float32),
                                           g),
                              jax.tree.map(lambda a: a.astype(jnp.float32),
                                           g_ox), rtol=tol, atol=tol)


# --------------------------------------------------------------------------
# beyond optax's tests: the rest of the drop-in claims


@pytest.mark.parametrize("which", ("prob", "int"))
def test_vmap_and_jit_of_grad(which):
  """vmap over rows of unbatched calls, and jit of the gradient."""
  ours, theirs, labels = {"prob": (JS_PROB, OX_PROB, TS),
                          "int": (JS_INT, OX_INT, TS_INT)}[which]
  np.testing.assert_allclose(jax.vmap(ours)(YS, labels),
                             jax.vmap(theirs)(YS, labels), rtol=1e-6)
  np.testing.assert_allclose(jax.vmap(ours)(YS, labels), ours(YS, labels),
                             rtol=1e-6)
  grad = jax.jit(jax.grad(lambda z, t, f: jnp.sum(jax.vmap(f)(z, t))),
                 static_argnums=2)
  np.testing.assert_allclose(grad(YS, labels, ours), grad(YS, labels, theirs),
                             rtol=1e-6, atol=1e-7)


def test_prob_integer_one_hot_labels():
  """Integer one-hot labels are probabilities (no label gradient)."""
  onehot = TS.astype(np.int32)
  got = assert_matches_optax(JS_PROB, OX_PROB, YS, onehot)
  np.testing.assert_allclose(got, EXP, atol=1e-4)


@pytest.mark.parametrize("shape", ((3,), (1, 3), (2, 1)))
def test_prob_broadcastable_labels(shape):
  """Labels that broadcast to the logits' shape (rank promotion allowed for
  optax, whose ``labels * log_probs`` promotes)."""
  labels = {(3,): np.array([0.2, 0.3, 0.5], np.float32),
            (1, 3): np.array([[0.2, 0.3, 0.5]], np.float32),
            (2, 1): np.array([[0.5], [0.25]], np.float32)}[shape]
  with jax.numpy_rank_promotion("allow"):
    got = assert_matches_optax(JS_PROB, OX_PROB, YS, labels)
  np.testing.assert_allclose(got, np_prob(YS, labels), rtol=1e-6)


@pytest.mark.parametrize("axis", AXES[:2] + AXES[-2:])
def test_prob_axes(axis):
  """A tuple ``axis`` for the probability version too (optax reduces over
  the axes directly), with a class mask of the logits' rank."""
  flat, logits, labels, classes = _axes_case(axis)
  t_flat = jax.nn.one_hot(labels, classes) * 0.5 + 0.5 / classes
  t = _layout(t_flat, axis, logits.shape)
  got = assert_matches_optax(JS_PROB, OX_PROB, logits, t, axis=axis)
  np.testing.assert_allclose(got, np_prob(flat, t_flat), rtol=1e-6)
  mask = jnp.asarray(np.random.default_rng(1).random(logits.shape) < 0.7)
  assert_matches_optax(JS_PROB, OX_PROB, logits, t * mask, axis=axis,
                       where=mask, off=~mask)


@pytest.mark.parametrize("axis", ((3, 2), (-4, -3, -1)))
def test_int_axes_with_masks(axis):
  """A tuple ``axis`` with a class mask of the logits' rank and with a row
  mask of the batch shape."""
  _, logits, labels, _ = _axes_case(axis)
  mask = jnp.asarray(np.random.default_rng(2).random(logits.shape) < 0.7)
  assert_matches_optax(JS_INT, OX_INT, logits, labels, axis=axis, where=mask)
  rows = jnp.asarray(np.random.default_rng(3).random(labels.shape) < 0.5)
  assert_matches_optax(JS_INT, OX_INT, logits, labels, axis=axis, where=rows)
