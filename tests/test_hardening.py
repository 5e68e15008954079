"""The adversarial review's cases (hardening issue): each test failed on the
code before the fix. Values are checked against the float64 reference
(tests/reference.py) or a closed form, never only "runs"."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from helpers import ulp_close
from jax.experimental import checkify

import jax_softmax as js

INT_DTYPES = (np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32)


def _labels_for(dtype, vocab):
  """Valid labels of ``dtype`` spanning ``[0, vocab)`` (ends included)."""
  top = min(vocab - 1, np.iinfo(dtype).max)
  return np.array([0, top, top // 2], dtype)


# --------------------------------------------------------------------------
# 1, 2: label dtypes


@pytest.mark.slow
@pytest.mark.parametrize("dtype", INT_DTYPES)
@pytest.mark.parametrize("vocab", (2, 127, 128, 200, 255, 256, 257, 50257))
def test_every_integer_label_dtype_for_every_vocab(dtype, vocab):
  y = _labels_for(dtype, vocab)
  z = jnp.zeros((3, vocab))
  want = np.full(3, math.log(vocab), np.float32)
  for fn in (js.cross_entropy, js.nll_loss):
    arg = z if fn is js.cross_entropy else z - math.log(vocab)
    out = fn(arg, jnp.asarray(y), reduction="none")
    np.testing.assert_allclose(out, want, rtol=1e-6)
    jit_out = jax.jit(lambda a, t, fn=fn: fn(a, t, reduction="none"))(
        arg, jnp.asarray(y))
    np.testing.assert_allclose(jit_out, want, rtol=1e-6)
  x = jnp.ones((3, 4))
  w = jnp.zeros((4, vocab))
  np.testing.assert_allclose(
      js.linear_cross_entropy(x, w, jnp.asarray(y), reduction="none"), want,
      rtol=1e-6)
  np.testing.assert_allclose(js.linear_softmax_loss(w, x, jnp.asarray(y)),
                             math.log(vocab), rtol=1e-6)


@pytest.mark.parametrize("dtype,vocab,bad", ((np.uint8, 200, 250),
                                             (np.int8, 100, 120),
                                             (np.int16, 1000, 30000)))
def test_bad_narrow_labels_named_eagerly_and_under_checkify(dtype, vocab, bad):
  y = np.array([0, bad], dtype)
  z = jnp.zeros((2, vocab))
  msg = f"label {bad} at position .*1.* outside \\[0, {vocab}\\)"
  with pytest.raises(ValueError, match=msg):
    js.cross_entropy(z, y)
  f = jax.jit(lambda z, y: js.cross_entropy(z, y, check_labels=True))
  err, out = checkify.checkify(f)(z, jnp.asarray(y))
  assert np.isnan(out)
  with pytest.raises(ValueError, match=msg):
    err.throw()


@pytest.mark.parametrize("label", (2**32 + 1, 2**31, -(2**31) - 1))
def test_int64_labels_beyond_int32_raise_before_conversion(label):
  y = np.array([0, label], np.int64)
  for call in (lambda: js.cross_entropy(jnp.zeros((2, 3)), y),
               lambda: js.nll_loss(jnp.zeros((2, 3)), y),
               lambda: js.linear_cross_entropy(jnp.ones((2, 2)),
                                               jnp.ones((2, 3)), y),
               lambda: js.linear_softmax_loss(jnp.ones((2, 3)),
                                              jnp.ones((2, 2)), y)):
    with pytest.raises(ValueError, match=f"label {label} at position"):
      call()
  with pytest.raises(ValueError, match=f"label {2**32}"):
    js.cross_entropy(jnp.zeros((1, 3)), np.array([2**32], np.uint64))


def test_traced_uint32_labels_beyond_int32_are_nan_not_ignored():
  # 2**32 - 100 would wrap to -100 (the default ignore_index) in int32.
  y = jnp.array([1, 2**32 - 100], jnp.uint32)
  out = jax.jit(lambda z, y: js.cross_entropy(z, y, reduction="none"))(
      jnp.zeros((2, 3)), y)
  assert np.isfinite(out[0]) and np.isnan(out[1])


# --------------------------------------------------------------------------
# 3: soft_cap edges


@pytest.mark.slow
def test_huge_soft_cap_is_no_cap():
  z = jnp.array([[1.0, 2.0, -3.0], [1e-3, 0.0, 5.0]])
  y = jnp.array([0, 2])
  for fn in (lambda z, **k: js.cross_entropy(z, y, **k),
             lambda z, **k: js.linear_cross_entropy(z, jnp.eye(3), y, **k)):
    plain = jax.value_and_grad(fn)(z)
    capped = jax.value_and_grad(lambda z, fn=fn: fn(z, soft_cap=1e38))(z)
    assert capped[0] == plain[0]             # the loss: bit for bit
    # (the capped gradient recomputes exp: one float32 rounding apart)
    chex.assert_trees_all_close(capped[1], plain[1], rtol=3e-7, atol=0)


@pytest.mark.parametrize("cap", (0, 0.0, -1.0, math.inf, math.nan))
def test_bad_soft_cap_is_a_value_error(cap):
  with pytest.raises(ValueError, match="soft_cap"):
    js.cross_entropy(jnp.zeros((1, 3)), jnp.array([0]), soft_cap=cap)
  with pytest.raises(ValueError, match="soft_cap"):
    js.linear_cross_entropy(jnp.ones((1, 2)), jnp.ones((2, 3)),
                            jnp.array([0]), soft_cap=cap)


# --------------------------------------------------------------------------
# 4: uncounted rows leak into no gradient


@pytest.mark.slow
@pytest.mark.parametrize("poison", (np.nan, np.inf, -np.inf))
@pytest.mark.parametrize("how", ("where", "ignore_index"))
def test_uncounted_rows_reach_no_hyperparameter_gradient(poison, how):
  rng = np.random.default_rng(0)
  z = rng.normal(size=(4, 5)).astype(np.float32)
  z[2] = poison
  y = np.array([1, 0, 3, 4])
  keep = np.array([True, True, False, True])
  kw = {"where": keep} if how == "where" else {"ignore_index": 7}
  if how == "ignore_index":
    y[2] = 7
  cw = jnp.linspace(0.5, 2.0, 5)
  lp = np.array(jax.nn.log_softmax(jnp.asarray(z)))
  lp[2] = poison
  grads = jax.grad(lambda cw: js.nll_loss(jnp.asarray(lp), y, class_weights=cw,
                                          **kw))(cw)
  assert np.all(np.isfinite(grads))

  def objective(z, t, hp, kw=kw):
    return js.cross_entropy(z, t, **kw, **hp)

  hp = {"class_weights": cw, "label_smoothing": 0.1, "z_loss": 0.01,
        "soft_cap": 4.0}
  g = jax.grad(objective, (0, 2))(jnp.asarray(z), y, hp)
  assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(g))
  np.testing.assert_array_equal(g[0][2], 0.0)
  # Probability targets holding the poison on the masked row too: the
  # gradients equal those of the batch without that row.
  t = np.array(jax.nn.softmax(jnp.asarray(rng.normal(size=(4, 5)))))
  t[2] = poison
  g = jax.grad(objective, (0, 1, 2))(jnp.asarray(z), jnp.asarray(t), hp,
                                     {"where": keep})
  assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(g))
  clean = jax.grad(objective, (0, 1, 2))(jnp.asarray(z[keep]),
                                         jnp.asarray(t[keep]), hp, {})
  chex.assert_trees_all_close(g[2], clean[2], rtol=1e-5)
  chex.assert_trees_all_close(g[1][keep], clean[1], rtol=1e-5)


# --------------------------------------------------------------------------
# 5: value and gradient agree on finiteness


@pytest.mark.parametrize("case", ("smoothing_one", "zero_weight"))
@pytest.mark.parametrize("masked", (False, True))
def test_zero_coefficient_terms_drop_out_of_value_and_gradient(case, masked):
  z = np.array([[0.5, -1.0, 2.0], [1.0, 0.0, -0.5]], np.float32)
  y = np.array([0, 1])
  where = None
  if masked:
    where = np.array([[False, True, True], [True, True, True]])
  else:
    z[0, 0] = -np.inf
  kw = ({"label_smoothing": 1.0} if case == "smoothing_one" else
        {"class_weights": np.array([0.0, 1.0, 2.0], np.float32)})
  kw.update(where=where, reduction="sum")
  val, dz = jax.value_and_grad(js.cross_entropy)(jnp.asarray(z), y, **kw)
  assert np.isfinite(val) and np.all(np.isfinite(dz))
  np.testing.assert_allclose(val, ref.cross_entropy(z, y, **kw), rtol=1e-6)
  want, _ = ref.cross_entropy_vjp(z, y, 1.0, **kw)
  np.testing.assert_allclose(dz, want, rtol=1e-5, atol=1e-7)
  if case == "zero_weight" and not masked:
    lp = np.asarray(jax.nn.log_softmax(jnp.asarray(z)))
    nll = js.nll_loss(jnp.asarray(lp), y, class_weights=kw["class_weights"],
                      reduction="sum")
    np.testing.assert_allclose(nll, -lp[1, 1], rtol=1e-6)


# --------------------------------------------------------------------------
# 7: entropy of an empty support


@pytest.mark.slow
def test_aux_entropy_of_empty_rows_is_zero():
  z = jnp.array([[1.0, 2.0, 0.5], [-jnp.inf] * 3, [0.0, 1.0, 2.0]])
  where = jnp.array([[True] * 3, [True] * 3, [False] * 3])
  y = jnp.array([0, 1, 2])

  def objective(z):
    loss, aux = js.cross_entropy(z, y, where=where, return_aux=True)
    return loss - 0.01 * jnp.mean(aux.entropy) + 1e-4 * jnp.mean(
        jnp.where(jnp.isfinite(aux.lse), aux.lse, 0.0) ** 2), aux

  (val, aux), dz = jax.value_and_grad(objective, has_aux=True)(z)
  np.testing.assert_array_equal(aux.entropy[1:], 0.0)
  assert aux.lse[1] == -np.inf and aux.lse[2] == -np.inf
  assert np.isfinite(val) and np.all(np.isfinite(dz))
  np.testing.assert_array_equal(dz[1:], 0.0)
  p = jax.nn.softmax(z[0])
  np.testing.assert_allclose(aux.entropy[0], -jnp.sum(p * jnp.log(p)),
                             rtol=1e-6)
  # The fused loss: an all -inf bias empties every row.
  x = jnp.ones((2, 3))
  _, faux = js.linear_cross_entropy(x, jnp.ones((3, 4)), jnp.array([0, 1]),
                                    bias=jnp.full((4,), -jnp.inf),
                                    return_aux=True)
  np.testing.assert_array_equal(faux.entropy, 0.0)
  g = jax.grad(lambda x: jnp.sum(js.linear_cross_entropy(
      x, jnp.ones((3, 4)), jnp.array([0, 1]), bias=jnp.full((4,), -jnp.inf),
      return_aux=True)[1].entropy))(x)
  np.testing.assert_array_equal(g, 0.0)


# --------------------------------------------------------------------------
# 8: precision of small losses


def test_confident_row_keeps_its_small_loss():
  z = jnp.array([[20.0, 0.0], [0.0, -30.0], [1000.0, 980.0]])
  y = jnp.array([0, 0, 0])
  out = js.cross_entropy(z, y, reduction="none")
  want = np.log1p(np.exp(-np.array([20.0, 30.0, 20.0])))
  np.testing.assert_allclose(out, want, rtol=2**-22)
  x = jnp.eye(2)
  np.testing.assert_allclose(
      js.linear_cross_entropy(x, z[:2].T, y[:2], reduction="none"),
      want[:2], rtol=2**-22)


@pytest.mark.parametrize("fused", (False, True))
@pytest.mark.parametrize("labels", ("int", "probs"))
def test_confident_row_keeps_its_small_loss_under_smoothing(fused, labels):
  # Found by hypothesis: with label smoothing the smoothing term's
  # log sum exp(z - m) = log(1 + 1e-24) rounded to 0, so a row weighted
  # only at its (confident) top class lost its 0.05 * nll (0.9 nll instead
  # of 0.95 nll). The top class is the label (row 0) or not (row 1).
  z = np.array([[54.15, 0.0], [54.15, 0.0]], np.float32)
  cw = jnp.array([1.0, 0.0])
  y = np.array([0, 1])
  t = y if labels == "int" else np.eye(2, dtype=np.float32)[y]
  kw = dict(label_smoothing=0.1, class_weights=cw, reduction="none")
  want = ref.cross_entropy(z, t, **kw)
  assert want[0] > 0 and want[1] > 0
  if fused:
    if labels == "probs":
      pytest.skip("linear_cross_entropy takes integer labels")
    out = js.linear_cross_entropy(jnp.eye(2), jnp.asarray(z), y, **kw)
  else:
    out = js.cross_entropy(jnp.asarray(z), t, **kw)
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5)


@pytest.mark.parametrize("base", (0.0, -1000.0, 1000.0))
def test_float32_loss_within_3_ulps_of_float64(base):
  rng = np.random.default_rng(1)
  z = (base + 3 * rng.normal(size=(4000, 50))).astype(np.float32)
  y = rng.integers(0, 50, 4000)
  out = np.asarray(js.cross_entropy(jnp.asarray(z), y, reduction="none"))
  want = ref.cross_entropy(z, y, reduction="none")
  ulp_close(out, want, 4.0)


# --------------------------------------------------------------------------
# 9: overflow and the zero-denominator guard


@pytest.mark.parametrize("reduction", ("none", "sum", "mean"))
def test_z_loss_term_does_not_overflow_before_the_product(reduction):
  z = jnp.array([[1e20, 0.0], [3.0, 1.0]])
  y = jnp.array([0, 1])
  out = js.cross_entropy(z, y, z_loss=1e-4, reduction=reduction)
  want = ref.cross_entropy(np.asarray(z), np.asarray(y), z_loss=1e-4,
                           reduction=reduction)
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out, want, rtol=1e-6)


def test_class_weights_summing_to_zero_are_not_taken_for_an_empty_batch():
  z = jnp.array([[1.0, 2.0], [0.5, 0.0]])
  y = jnp.array([0, 1])
  cw = jnp.array([1.0, -1.0])
  out = js.cross_entropy(z, y, class_weights=cw)          # sum / 0
  assert np.isinf(out) or np.isnan(out)
  np.testing.assert_array_equal(js.cross_entropy(
      z, y, class_weights=cw, where=jnp.array([False, False])), 0.0)


# --------------------------------------------------------------------------
# 10: half precision, gradient in the forward pass, rounded once


@pytest.mark.slow
@pytest.mark.parametrize("dtype,scale,upcast", (
    (jnp.bfloat16, 0.37, True), (jnp.bfloat16, 0.37, False),
    (jnp.bfloat16, 2.0**16, False), (jnp.float16, 2.0**16, True)))
def test_half_precision_gradients_rounded_once_after_the_cotangent(
    monkeypatch, dtype, scale, upcast):
  # With the matmuls in float32 (upcast: float16 on CPU, any policy that
  # converts) the gradient is the float32 one of the same path (gradient
  # in the forward pass or recomputed) rounded once, bit for bit. With
  # bfloat16 products (CPU's bfloat16 policy, GPU, TPU) dz is also
  # rounded to bfloat16 before its matmuls: within 2 bfloat16 ulps of the
  # largest entry.
  from jax_softmax import _linear_ce
  from jax_softmax._numerics import MatmulPolicy
  monkeypatch.setattr(_linear_ce, "matmul_policy",
                      lambda *_: MatmulPolicy(upcast, True, not upcast))
  b, d, v = 64, 32, 256
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (b, d)).astype(dtype)
  w = (0.2 * jax.random.normal(kw, (d, v))).astype(dtype)
  y = jnp.arange(b) % v

  def loss(x, w, **kw):
    return scale * js.linear_cross_entropy(x, w, y, chunk_size=16, **kw)

  for gif in (None, False):
    grad = jax.grad(lambda x, w, gif=gif: loss(x, w, grad_in_forward=gif),
                    (0, 1))
    exact = grad(x.astype(jnp.float32), w.astype(jnp.float32))
    for g, e in zip(grad(x, w), exact, strict=True):
      assert g.dtype == dtype
      rounded = np.asarray(e.astype(dtype).astype(jnp.float32))
      g = np.asarray(g.astype(jnp.float32))
      if not upcast:
        top = np.float32(np.max(np.abs(rounded)))
        ulp = np.spacing(np.asarray(top, dtype=dtype)).astype(np.float32)
        assert np.max(np.abs(g - rounded)) <= 2 * ulp
        assert np.sum((g == 0) & (rounded != 0)) <= 0.01 * g.size
        continue
      np.testing.assert_array_equal(g, rounded)
      # No flush to zero where the exact gradient is representable.
      assert np.sum((g == 0) & (rounded != 0)) == 0


# --------------------------------------------------------------------------
# 11: second order through probability targets


def test_second_order_through_probability_targets():
  z = jnp.array([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
  t = jnp.array([[0.0, 0.3, 0.7], [1.0, 0.0, 0.0]])

  def value(t):
    return jnp.sum(jax.value_and_grad(
        lambda t: jnp.sum(js.softmax_cross_entropy(z, t)))(t)[0])

  np.testing.assert_allclose(jax.grad(value)(t), -jax.nn.log_softmax(z),
                             rtol=1e-6)
  jax.test_util.check_grads(lambda t: js.softmax_cross_entropy(z, t), (t,),
                            order=2, modes=["rev"], atol=1e-2, rtol=1e-2)


# --------------------------------------------------------------------------
# 12, 14: empty batches, chunk clamped


@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
@pytest.mark.parametrize("gif", (None, False))
def test_fused_loss_on_an_empty_batch(reduction, gif):
  if gif is None and reduction == "none":
    gif = False
  x = jnp.zeros((0, 4))
  w = jnp.ones((4, 10))
  y = jnp.zeros((0,), jnp.int32)

  def f(x, w):
    out = js.linear_cross_entropy(x, w, y, reduction=reduction,
                                  grad_in_forward=gif)
    return jnp.sum(out), out

  (val, out), (dx, dw) = jax.value_and_grad(f, (0, 1), has_aux=True)(x, w)
  assert out.shape == ((0,) if reduction == "none" else ())
  assert val == 0.0
  chex.assert_shape((dx, dw), [(0, 4), (4, 10)])
  np.testing.assert_array_equal(dw, 0.0)
  for fn in (js.cross_entropy, js.nll_loss):
    out = fn(jnp.zeros((0, 5)), jnp.zeros((0,), jnp.int32),
             reduction=reduction)
    assert out.shape == ((0,) if reduction == "none" else ())
    np.testing.assert_array_equal(out, 0.0)


@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
@pytest.mark.parametrize("b", (0, 3))
def test_zero_classes(reduction, b):
  # A zero-length class axis (it once raised ZeroDivisionError): every row
  # has no class left, so it is uncounted: loss 0 (optax's too), empty
  # gradients; integer labels other than ignore_index are out of range.
  z, t = jnp.zeros((b, 0)), jnp.zeros((b, 0))
  ign = jnp.full((b,), -100)
  shape = (b,) if reduction == "none" else ()

  def check(f, *args):
    val, grads = jax.value_and_grad(lambda *a: jnp.sum(f(*a)),
                                    tuple(range(len(args))))(*args)
    out = f(*args)
    assert out.shape == shape and out.dtype == jnp.float32
    np.testing.assert_array_equal(out, 0.0)
    assert val == 0.0
    chex.assert_trees_all_equal_shapes(grads, args)
    chex.assert_trees_all_equal(grads, jax.tree.map(jnp.zeros_like, args))

  check(lambda z: js.cross_entropy(z, t, reduction=reduction), z)
  check(lambda z: js.cross_entropy(z, ign, reduction=reduction), z)
  check(lambda z: js.nll_loss(z, ign, reduction=reduction), z)
  check(lambda z: js.log_prob_objective(z, ign, lambda lp, h: lp - h,
                                        reduction=reduction), z)
  x, w = jnp.ones((b, 4)), jnp.zeros((4, 0))
  check(lambda x, w: js.linear_cross_entropy(x, w, ign, reduction=reduction),
        x, w)
  check(lambda x, w: js.linear_log_prob_objective(
      x, w, ign, lambda lp, h: lp - h, reduction=reduction), x, w)
  if reduction == "none":
    np.testing.assert_array_equal(js.softmax_cross_entropy(z, t),
                                  optax.softmax_cross_entropy(z, t))
  _, aux = js.cross_entropy(z, t, return_aux=True)
  np.testing.assert_array_equal(aux.lse, -np.inf)
  np.testing.assert_array_equal(aux.entropy, 0.0)
  np.testing.assert_array_equal(aux.argmax, 0)
  if b:
    with pytest.raises(ValueError, match=r"outside \[0, 0\)"):
      js.cross_entropy(z, jnp.zeros((b,), jnp.int32))


def test_chunk_larger_than_the_batch_is_clamped():
  b, d, v = 8, 16, 32000
  args = (jax.ShapeDtypeStruct((b, d), jnp.float32),
          jax.ShapeDtypeStruct((d, v), jnp.float32),
          jax.ShapeDtypeStruct((b,), jnp.int32))

  def temp(chunk):
    f = jax.value_and_grad(lambda x, w, y: js.linear_cross_entropy(
        x, w, y, chunk_size=chunk), (0, 1))
    return jax.jit(f).lower(*args).compile().memory_analysis(
    ).temp_size_in_bytes

  assert temp(4096) == temp(b)
  assert temp(4096) < 4 * b * v * 4 + 2 * d * v * 4


# --------------------------------------------------------------------------
# 13: debug_nans / debug_infs stay quiet on valid inputs


@pytest.mark.slow
@pytest.mark.parametrize("flag", ("jax_debug_nans", "jax_debug_infs"))
@pytest.mark.parametrize("jit", (False, True))
def test_valid_inputs_never_trip_debug_nans(flag, jit):
  # -inf logits are valid inputs, but debug_infs flags any inf, inputs
  # included (jnp.asarray of them trips it): there, masks instead.
  neg = -jnp.inf if flag == "jax_debug_nans" else 0.0
  z = jnp.array([[1.0, neg, 2.0, 0.5], [0.0, 1.0, neg, 3.0]])
  where = jnp.array([[True, False, True, False], [True, True, False, True]])
  y = jnp.array([0, 3])
  cw = jnp.array([1.0, 0.0, 2.0, 1.0])
  x = jnp.ones((2, 3))
  w = jnp.ones((3, 4))
  bias = jnp.array([0.0, neg, 1.0, 0.0])

  def objective(z, x, w):
    loss, aux = js.cross_entropy(z, y, where=where, class_weights=cw,
                                 label_smoothing=0.1, z_loss=1e-3,
                                 soft_cap=5.0, return_aux=True)
    fused, faux = js.linear_cross_entropy(x, w, y, bias=bias,
                                          label_smoothing=0.1,
                                          return_aux=True)
    # (log_softmax gives -inf on masked entries by contract: not with infs.)
    lp = (js.log_softmax(z, where=where) if flag == "jax_debug_nans" else
          js.log_softmax(z))
    nll = js.nll_loss(jnp.where(where, lp, 0.0), y)
    return (loss + fused + nll + jnp.sum(aux.entropy) + jnp.sum(aux.lse)
            + jnp.sum(faux.entropy) + jnp.sum(faux.lse))

  run = jax.value_and_grad(objective, (0, 1, 2))
  run = jax.jit(run) if jit else run
  with _flag(flag):
    val, grads = run(z, x, w)
  assert np.isfinite(val)
  assert all(np.all(np.isfinite(g)) for g in grads)


class _flag:
  """Sets a jax config flag for a block (restores it after)."""

  def __init__(self, name):
    self.name = name

  def __enter__(self):
    self.old = getattr(jax.config, self.name)
    jax.config.update(self.name, True)

  def __exit__(self, *exc):
    jax.config.update(self.name, self.old)


# --------------------------------------------------------------------------
# clear errors


def test_bad_arguments_name_the_parameter():
  z = jnp.zeros((2, 3))
  y = jnp.array([0, 1])
  x, w = jnp.ones((2, 4)), jnp.ones((4, 3))
  cases = [
      (TypeError, "axis", lambda: js.cross_entropy(z, y, axis=1.0)),
      (TypeError, "axis", lambda: js.softmax(z, axis="x")),
      (TypeError, "chunk_size", lambda: js.linear_cross_entropy(
          x, w, y, chunk_size=2.5)),
      (TypeError, "chunk_size", lambda: js.linear_cross_entropy(
          x, w, y, chunk_size="4")),
      (TypeError, "chunk_size", lambda: jax.jit(
          lambda c: js.linear_cross_entropy(x, w, y, chunk_size=c))(4)),
      (ValueError, "label_smoothing", lambda: js.cross_entropy(
          z, y, label_smoothing=1.5)),
      (ValueError, "label_smoothing", lambda: js.cross_entropy(
          z, y, label_smoothing=-0.1)),
      (ValueError, "z_loss", lambda: js.cross_entropy(z, y, z_loss=-1.0)),
      (TypeError, "ignore_index", lambda: js.cross_entropy(
          z, y, ignore_index=1.5)),
      (TypeError, "ignore_index", lambda: js.nll_loss(
          z, y, ignore_index="a")),
      (ValueError, "reg", lambda: js.linear_softmax_loss(
          w, x, jnp.array([0, 1]), jnp.ones((2,)))),
      (TypeError, "label_smoothing", lambda: js.cross_entropy(
          z, y, label_smoothing="0.1")),
      (TypeError, "z_loss", lambda: js.cross_entropy(z, y, z_loss=True)),
      (ValueError, "w_layout='vd'", lambda: js.linear_cross_entropy(
          x, jnp.ones((3, 4)), y)),
  ]
  for err, name, call in cases:
    with pytest.raises(err, match=name):
      call()


# --------------------------------------------------------------------------
# conventions: ignore_index=-100, optax drop-ins


@pytest.mark.slow
def test_minus_100_is_ignored_by_default():
  rng = np.random.default_rng(2)
  z = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
  y = jnp.array([1, -100, 5, -100])
  keep = np.array([0, 2])
  x, w = z, jnp.eye(6)
  for fn, args, sub in (
      (js.cross_entropy, (z,), (z[keep],)),
      (js.nll_loss, (jax.nn.log_softmax(z),), (jax.nn.log_softmax(z)[keep],)),
      (js.linear_cross_entropy, (x, w), (x[keep], w)),
      (js.linear_softmax_loss, (w, x), (w, x[keep]))):
    want = fn(*sub, y[keep])
    np.testing.assert_allclose(fn(*args, y), want, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(fn)(*args, y), want, rtol=1e-6)
  with pytest.raises(ValueError, match="label -100"):
    js.cross_entropy(z, y, ignore_index=None)
  assert np.isnan(jax.jit(lambda z, y: js.cross_entropy(
      z, y, ignore_index=None))(z, y))
  # The optax drop-ins keep optax's behaviour: no ignore_index.
  with pytest.raises(ValueError, match="label -100"):
    js.softmax_cross_entropy_with_integer_labels(z, y)


def _masks(shape):
  rng = np.random.default_rng(3)
  full = rng.random(shape) > 0.3
  full[0] = False                                    # a row with no class
  return full


@pytest.mark.slow
def test_drop_ins_equal_optax_with_masks_that_hide_target_mass():
  rng = np.random.default_rng(4)
  z = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 5, 6))
  t = jax.nn.softmax(jnp.asarray(rng.normal(size=(6, 5)), jnp.float32))
  mask = jnp.asarray(_masks((6, 5)))
  rows = jnp.asarray(rng.random(6) > 0.4)
  for where in (mask, rows):
    for ours, theirs, target in (
        (js.softmax_cross_entropy_with_integer_labels,
         optax.softmax_cross_entropy_with_integer_labels, y),
        (js.softmax_cross_entropy, optax.softmax_cross_entropy, t)):
      def f(z, fn=ours, target=target, where=where):
        return jnp.sum(fn(z, target, where=where) * jnp.arange(1, 7))

      def g(z, fn=theirs, target=target, where=where):
        return jnp.sum(fn(z, target, where=where) * jnp.arange(1, 7))

      chex.assert_trees_all_close(jax.value_and_grad(f)(z),
                                  jax.value_and_grad(g)(z), rtol=1e-5,
                                  atol=1e-6)
  np.testing.assert_allclose(
      js.softmax_cross_entropy(z, t, where=mask),
      ref.softmax_cross_entropy(np.asarray(z), np.asarray(t), where=mask),
      rtol=1e-5)
  np.testing.assert_allclose(
      js.softmax_cross_entropy_with_integer_labels(z, y, where=mask),
      ref.softmax_cross_entropy_with_integer_labels(np.asarray(z),
                                                    np.asarray(y),
                                                    where=mask), rtol=1e-5)


def test_softmax_cross_entropy_takes_int_one_hot_and_broadcast_labels():
  z = jnp.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
  onehot = jnp.array([[0, 1, 0], [1, 0, 0]], jnp.int32)
  np.testing.assert_allclose(js.softmax_cross_entropy(z, onehot),
                             optax.softmax_cross_entropy(z, onehot),
                             rtol=1e-6)
  uniform = jnp.full((3,), 1 / 3)
  np.testing.assert_allclose(js.softmax_cross_entropy(z, uniform),
                             optax.softmax_cross_entropy(
                                 z, jnp.broadcast_to(uniform, z.shape)),
                             rtol=1e-6)


# --------------------------------------------------------------------------
# eager calls compile once


def test_eager_calls_reuse_the_compiled_kernel():
  from jax_softmax import _fused, _losses

  z = jnp.ones((4, 7))
  y = jnp.array([0, 1, 2, 3])
  js.cross_entropy(z, y)
  before = _losses._cross_entropy_jit._cache_size()
  for _ in range(3):
    js.cross_entropy(z + 1.0, y)
  assert _losses._cross_entropy_jit._cache_size() == before
  x, w = jnp.ones((4, 3)), jnp.ones((3, 7))
  js.linear_cross_entropy(x, w, y)
  before = _fused._fused_jit._cache_size()
  for _ in range(3):
    js.linear_cross_entropy(x * 2.0, w, y)
  assert _fused._fused_jit._cache_size() == before


# --------------------------------------------------------------------------
# logits made inside a model


@pytest.mark.parametrize("dtype", (jnp.float32, jnp.bfloat16))
@pytest.mark.parametrize("batch", ((8, 64), (4, 8, 16)))
def test_model_logits_cost_no_more_than_optax(batch, dtype):
  # h @ emb.T with h of shape (*batch, d): the weight gradient's dot reads
  # dz transposed; dz must be made once (no third (b, V) buffer).
  d, v = 32, 4096
  args = (jax.ShapeDtypeStruct((*batch, d), dtype),
          jax.ShapeDtypeStruct((v, d), dtype),
          jax.ShapeDtypeStruct(batch, jnp.int32))

  def temp(loss):
    f = jax.value_and_grad(
        lambda h, emb, y: loss(jnp.matmul(
            h, emb.T, preferred_element_type=jnp.float32), y), (0, 1))
    return jax.jit(f).lower(*args).compile().memory_analysis(
    ).temp_size_in_bytes

  ours = temp(js.cross_entropy)
  theirs = temp(lambda z, y: jnp.mean(
      optax.softmax_cross_entropy_with_integer_labels(z, y)))
  rows = math.prod(batch)
  assert ours <= theirs + rows * 64, (ours, theirs)
  assert ours < 2.5 * rows * v * 4, ours


# --------------------------------------------------------------------------
# The fourth review (2026-12-04)


@pytest.mark.parametrize("ignore_index", [2**31 - 1, -(2**31)])
def test_out_of_range_labels_never_become_an_extreme_ignore_index(
    ignore_index):
  # Labels beyond int32 are clipped to it; clipped onto an ignore_index at
  # the int32 extreme they were silently ignored (a 0 loss, left out of
  # the mean).
  z = jnp.array([[0.0, 1.0, 2.0], [1.0, 0.0, 0.0]])
  far = np.array([0, 2**33 if ignore_index > 0 else -(2**40)])
  for fn in (js.cross_entropy, js.nll_loss):
    with pytest.raises(ValueError, match=f"label {far[1]} at position"):
      fn(z, far, ignore_index=ignore_index)
  # Traced uint32 labels (clipped inside jit): NaN for that row.
  if ignore_index > 0:
    y = jnp.array([0, 2**32 - 1], jnp.uint32)
    got = jax.jit(lambda z, y: js.cross_entropy(
        z, y, ignore_index=ignore_index, reduction="none"))(z, y)
    np.testing.assert_allclose(got[0], ref.cross_entropy(
        np.asarray(z[:1]), np.array([0]), reduction="none")[0], rtol=1e-6)
    assert np.isnan(got[1])
    err, _ = jax.jit(checkify.checkify(lambda z, y: js.cross_entropy(
        z, y, ignore_index=ignore_index, check_labels=True)))(z, y)
    with pytest.raises(checkify.JaxRuntimeError, match="outside"):
      err.throw()


@pytest.mark.parametrize("ignore_index", [2**31 - 1, -(2**31)])
def test_a_label_equal_to_an_extreme_ignore_index_stays_ignored(
    ignore_index):
  # The clip above once moved every label to one short of the extreme, so
  # a label equal to ignore_index became class 2**31 - 2: a NaN row.
  z = jnp.array([[0.0, 1.0, 2.0], [1.0, 0.0, 0.0]])
  want = np.array([ref.cross_entropy(np.asarray(z[:1]), np.array([0]),
                                     reduction="none")[0], 0.0])
  labels = [np.array([0, ignore_index]), jnp.array([0, ignore_index])]
  if ignore_index > 0:
    labels.append(jnp.array([0, ignore_index], jnp.uint32))
  for y in labels:
    for fn, a in ((js.cross_entropy, z), (js.nll_loss, jax.nn.log_softmax(z))):
      f = functools.partial(fn, ignore_index=ignore_index, reduction="none")
      for g in (f, jax.jit(f)):
        np.testing.assert_allclose(g(a, y), want, rtol=1e-6)
      mean = jax.jit(functools.partial(fn, ignore_index=ignore_index))(a, y)
      np.testing.assert_allclose(mean, want[0], rtol=1e-6)


@pytest.mark.parametrize("kw", [{"ignore_index": -100}, {"where": True}],
                         ids=["ignore_index", "where"])
def test_reverse_over_reverse_is_zero_on_an_uncounted_nan_row(kw):
  # Twice reverse-mode: the row max's backward turned the zero cotangent of
  # an uncounted NaN row into NaN (forward-over-reverse was right).
  z = jnp.array([[2.0, 1.0, 0.5, 0.0], [np.nan, 0.3, 0.1, -1.0]])
  y = jnp.array([0, -100 if "ignore_index" in kw else 1])
  where = jnp.array([True, False]) if "where" in kw else None
  v = jnp.array([[1.0, -2.0, 0.5, 0.0], [1.0, 1.0, 1.0, 1.0]])
  p = np.exp(np.asarray(z[0], np.float64))
  p /= p.sum()
  want = np.zeros((2, 4))
  want[0] = p * np.asarray(v[0]) - p * (p @ np.asarray(v[0]))  # H v, row 0
  for loss in (lambda a: js.cross_entropy(a, y, where=where),
               lambda a: js.log_prob_objective(a, y, lambda lp, h: -lp,
                                               where=where)):
    hvp = jax.grad(lambda a, f=loss: jnp.vdot(jax.grad(f)(a), v))(z)
    np.testing.assert_allclose(hvp, want, rtol=1e-5, atol=1e-7)
    assert not np.isnan(np.asarray(jax.jacrev(jax.grad(loss))(z))).any()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_nll_class_weight_gradient_of_a_zero_weight_row_at_minus_inf(
    reduction):
  # weights = 0 on a row whose target log-probability is -inf: the row
  # drops out of the loss, and d/d class_weights was 0 * -inf = NaN.
  z = jnp.array([[-jnp.inf, 1.0, 0.0], [0.5, 0.2, 0.1]])
  y, weights = jnp.array([0, 1]), jnp.array([0.0, 1.0])
  cw = jnp.array([1.0, 2.0, 3.0])
  lp = js.log_softmax(z)
  got = jax.grad(lambda c: js.nll_loss(lp, y, weights=weights,
                                       class_weights=c,
                                       reduction=reduction))(cw)
  nll1 = float(-np.asarray(lp, np.float64)[1, 1])
  # mean: sum_i u_i c_yi nll_i / sum_i c_yi (the weights leave the
  # denominator); only row 1 has a term.
  if reduction == "sum":
    want = [0.0, nll1, 0.0]
  else:
    den = 1.0 + 2.0
    want = [-2.0 * nll1 / den**2, nll1 / den - 2.0 * nll1 / den**2, 0.0]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  same = jax.grad(lambda c: js.cross_entropy(z, y, weights=weights,
                                             class_weights=c,
                                             reduction=reduction))(cw)
  np.testing.assert_allclose(got, same, rtol=1e-6)


def test_float64_weights_keep_the_float32_loss():
  # Under x64, float64 class weights made the loss float64 (the docs: the
  # loss has dtype result_type(logits, float32)); the gradients keep the
  # weights' dtype.
  z = np.array([[0.0, 1.0, 2.0], [1.0, 0.0, 0.0]], np.float32)
  y = np.array([0, 2])
  want = ref.cross_entropy(z, y, class_weights=np.array([1.0, 2.0, 3.0]))
  with jax.enable_x64(True):
    cw = jnp.array([1.0, 2.0, 3.0], jnp.float64)
    w = jnp.array([1.0, 1.0], jnp.float64)
    for f in (
        lambda c, w: js.cross_entropy(z, y, class_weights=c, weights=w),
        lambda c, w: js.nll_loss(js.log_softmax(z), y, class_weights=c,
                                 weights=w),
        lambda c, w: js.linear_cross_entropy(
            z, np.eye(3, dtype=np.float32), y, class_weights=c, weights=w)):
      v, (dc, dw) = jax.value_and_grad(f, (0, 1))(cw, w)
      assert (v.dtype, dc.dtype, dw.dtype) == (jnp.float32, jnp.float64,
                                               jnp.float64)
      np.testing.assert_allclose(v, want, rtol=1e-6)
