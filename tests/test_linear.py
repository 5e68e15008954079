"""Tests for the seed's linear softmax classifier.

``linear_softmax_loss`` and ``softmax_with_gradients`` are checked against
three independent references, all written here:

* ``seed_softmax_with_gradients``: the seed document's NumPy algorithm,
  restated in float64 (one *global* max over the whole batch);
* ``ref_loss`` / ``ref_grad_w``: float64 NumPy with a per-row log-sum-exp;
* ``plain_loss``: a plain ``jax.numpy`` version that JAX differentiates
  itself (any order, forward or reverse mode).
"""

from __future__ import annotations

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import jax_softmax as js
from jax_softmax import linear_softmax_loss, softmax_with_gradients

# --------------------------------------------------------------------------
# references


def seed_softmax_with_gradients(W, X, y, reg):  # noqa: N803
  """The seed's algorithm in float64: softmax shifted by ONE global max."""
  W, X = np.asarray(W, np.float64), np.asarray(X, np.float64)  # noqa: N806
  n = X.shape[0]
  rows = np.arange(n)
  z = X @ W
  e = np.exp(z - np.max(z))
  p = e / np.sum(e, axis=1, keepdims=True)
  loss = -np.sum(np.log(p[rows, y])) / n + reg * np.sum(W * W)
  p[rows, y] -= 1.0
  d_w = X.T @ p / n + 2.0 * reg * W
  return loss, d_w


def _counted(y, where, ignore_index):
  y = np.asarray(y)
  counted = np.ones(y.shape, bool)
  if where is not None:
    counted &= np.asarray(where)
  if ignore_index is not None:
    counted &= y != ignore_index
  return counted


def ref_loss(W, X, y, reg=0.0, *, where=None, ignore_index=None,  # noqa: N803
             class_weights=None, label_smoothing=0.0):
  """float64 NumPy, per-row log-sum-exp; torch's weighted-mean semantics."""
  W, X = np.asarray(W, np.float64), np.asarray(X, np.float64)  # noqa: N806
  y = np.asarray(y)
  c = W.shape[1]
  counted = _counted(y, where, ignore_index)
  wc = (np.ones(c) if class_weights is None
        else np.asarray(class_weights, np.float64))
  z = X @ W
  m = np.max(z, axis=1, keepdims=True)
  log_p = z - m - np.log(np.sum(np.exp(z - m), axis=1, keepdims=True))
  yc = np.where(counted, y, 0)
  w_y = wc[yc]
  nll_y = -log_p[np.arange(len(y)), yc]
  smooth = -(log_p @ wc) / c
  ce = (1 - label_smoothing) * w_y * nll_y + label_smoothing * smooth
  num = np.sum(np.where(counted, ce, 0.0))
  den = np.sum(np.where(counted, w_y, 0.0))
  data = num / den if den else 0.0
  return data + reg * np.sum(W * W)


def ref_grad_w(W, X, y, reg=0.0):  # noqa: N803
  """``X^T (P - Y) / n + 2 reg W`` in float64 with a per-row max."""
  W, X = np.asarray(W, np.float64), np.asarray(X, np.float64)  # noqa: N806
  n, c = X.shape[0], W.shape[1]
  z = X @ W
  e = np.exp(z - np.max(z, axis=1, keepdims=True))
  p = e / np.sum(e, axis=1, keepdims=True)
  return X.T @ (p - np.eye(c)[np.asarray(y)]) / n + 2.0 * reg * W


def plain_loss(W, X, y, reg=0.0, *, where=None, ignore_index=None,  # noqa: N803
               class_weights=None, label_smoothing=0.0):
  """Plain jax.numpy version: JAX differentiates it itself (any mode)."""
  c = W.shape[1]
  log_p = jax.nn.log_softmax(X @ W, axis=-1)
  onehot = jax.nn.one_hot(y, c, dtype=log_p.dtype)
  wc = (jnp.ones((1, c), log_p.dtype) if class_weights is None
        else jnp.asarray(class_weights, log_p.dtype)[None, :])
  w_y = jnp.sum(onehot * wc, axis=-1)
  nll_y = -jnp.sum(onehot * log_p, axis=-1)
  smooth = -jnp.sum(wc * log_p, axis=-1) / c
  ce = (1 - label_smoothing) * w_y * nll_y + label_smoothing * smooth
  counted = jnp.ones(y.shape, bool)
  if where is not None:
    counted = counted & where
  if ignore_index is not None:
    counted = counted & (y != ignore_index)
  num = jnp.sum(jnp.where(counted, ce, 0.0))
  den = jnp.sum(jnp.where(counted, w_y, 0.0))
  return num / den + reg * jnp.sum(W * W)


def _problem(seed, n=12, d=5, c=4, scale=1.0, dtype=np.float64):
  rng = np.random.default_rng(seed)
  W = (scale * rng.standard_normal((d, c))).astype(dtype)  # noqa: N806
  X = rng.standard_normal((n, d)).astype(dtype)  # noqa: N806
  y = rng.integers(0, c, n).astype(np.int32)
  return W, X, y


# Loss options, each with labels prepared for it.
OPTIONS = {
    "plain": {},
    "where": {"where": np.arange(12) % 3 != 1},
    "ignore_index": {"ignore_index": -1},
    "class_weights": {"class_weights": np.array([0.5, 2.0, 1.0, 3.0])},
    "label_smoothing": {"label_smoothing": 0.2},
    "all": {"where": np.arange(12) % 4 != 0, "ignore_index": -1,
            "class_weights": np.array([0.5, 2.0, 1.0, 3.0]),
            "label_smoothing": 0.1},
}


def _option_problem(name, seed=0):
  W, X, y = _problem(seed)  # noqa: N806
  opts = dict(OPTIONS[name])
  if "ignore_index" in opts:
    y = y.copy()
    y[[2, 7]] = opts["ignore_index"]
  return W, X, y, opts


def _jnp_opts(opts):
  return {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v)
          for k, v in opts.items()}


# --------------------------------------------------------------------------
# the seed's algorithm, where it is stable


@pytest.mark.parametrize("scale", [0.1, 1.0, 5.0])
@pytest.mark.parametrize("shape", [(1, 1, 2), (7, 3, 5), (64, 16, 10)])
@pytest.mark.parametrize("reg", [0.0, 0.3])
def test_equals_seed_float64(scale, shape, reg):
  n, d, c = shape
  W, X, y = _problem(n + d + c, n, d, c, scale)  # noqa: N806
  seed_loss, seed_dw = seed_softmax_with_gradients(W, X, y, reg)
  assert np.isfinite(seed_loss)
  with jax.enable_x64(True):
    loss, d_w = softmax_with_gradients(W, X, y, reg)
    chex.assert_type([loss, d_w], jnp.float64)
    chex.assert_shape(loss, ())
    chex.assert_shape(d_w, (d, c))
    np.testing.assert_allclose(loss, seed_loss, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(d_w, seed_dw, rtol=1e-12, atol=1e-15)


def test_equals_seed_float32():
  W, X, y = _problem(3, 32, 8, 6)  # noqa: N806
  seed_loss, seed_dw = seed_softmax_with_gradients(W, X, y, 0.05)
  loss, d_w = softmax_with_gradients(W.astype(np.float32),
                                     X.astype(np.float32), y, 0.05)
  chex.assert_type([loss, d_w], jnp.float32)
  np.testing.assert_allclose(loss, seed_loss, rtol=2e-6)
  np.testing.assert_allclose(d_w, seed_dw, rtol=1e-5, atol=1e-6)


def test_softmax_with_gradients_is_jitted_and_checks_concrete_labels():
  from jax_softmax import _linear
  W, X, y = _problem(1, dtype=np.float32)  # noqa: N806
  # One compiled program behind a thin wrapper that checks labels first.
  assert _linear._value_and_grad.lower(W, X, y, 0.1).as_text()
  bad = np.array(y).copy()
  bad[1] = W.shape[1]
  with pytest.raises(ValueError, match=r"position \(1,\)"):
    softmax_with_gradients(W, X, bad, 0.1)


# --------------------------------------------------------------------------
# the global-max pitfall


def _far_rows_problem(kind):
  """Inputs whose float32 logits are exact; one row ~1000 below another.

  The last feature only shifts a row's logits (its weights are all 1),
  which leaves that row's softmax unchanged: the loss equals the loss
  without the shift.
  """
  rng = np.random.default_rng(7)
  n, d, c = 6, 4, 5
  X = rng.integers(-3, 4, (n, d)).astype(np.float32)  # noqa: N806
  W = (rng.integers(-16, 17, (d, c)) / 8).astype(np.float32)  # noqa: N806
  W[-1] = 1.0
  X[:, -1] = 0.0
  if kind == "nan":    # a whole row underflows: 0 / 0
    X[3, -1] = -1000.0
  else:                # one row is far above the rest: every other row 0/0
    X[0, -1] = 1000.0
  y = rng.integers(0, c, n).astype(np.int32)
  return W, X, y


def test_far_rows_seed_example_readme():
  """The README's example: the seed gives NaN, ours log(2)/2."""
  W = np.eye(2)  # noqa: N806
  X = np.array([[1000.0, 0.0], [0.0, 0.0]])  # noqa: N806
  y = np.array([0, 1])
  with np.errstate(invalid="ignore", divide="ignore"):
    seed_loss, seed_dw = seed_softmax_with_gradients(W, X, y, 0.0)
  assert np.isnan(seed_loss)
  assert np.isnan(seed_dw).any()
  loss, d_w = softmax_with_gradients(W.astype(np.float32),
                                     X.astype(np.float32), y, 0.0)
  np.testing.assert_allclose(loss, np.log(2) / 2, rtol=1e-7)
  np.testing.assert_allclose(d_w, ref_grad_w(W, X, y), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["nan", "above"])
def test_far_rows_seed_fails_ours_exact(kind):
  W, X, y = _far_rows_problem(kind)  # noqa: N806
  reg = 0.25
  with np.errstate(invalid="ignore", divide="ignore"):
    seed_loss, _ = seed_softmax_with_gradients(W, X, y, reg)
  assert not np.isfinite(seed_loss)
  expected = ref_loss(W, X, y, reg)
  unshifted = X.copy()
  unshifted[:, -1] = 0.0
  np.testing.assert_allclose(expected, ref_loss(W, unshifted, y, reg),
                             rtol=1e-12)
  expected_dw = ref_grad_w(W, X, y, reg)
  with jax.debug_nans(True):
    loss32, dw32 = softmax_with_gradients(W, X, y, reg)
  chex.assert_tree_all_finite((loss32, dw32))
  np.testing.assert_allclose(loss32, expected, rtol=1e-6)
  np.testing.assert_allclose(dw32, expected_dw, rtol=1e-5, atol=1e-5)
  with jax.enable_x64(True):
    loss64, dw64 = softmax_with_gradients(W.astype(np.float64),
                                          X.astype(np.float64), y, reg)
    np.testing.assert_allclose(loss64, expected, rtol=1e-13)
    np.testing.assert_allclose(dw64, expected_dw, rtol=1e-12, atol=1e-12)


def test_far_label_logit_within_row():
  """The label's logit 800 below its row's max (and the global max)."""
  W = np.eye(2)  # noqa: N806
  X = np.array([[100.0, 900.0], [900.0, 899.0]])  # noqa: N806
  y = np.array([0, 0])
  with np.errstate(invalid="ignore", divide="ignore"):
    seed_loss, _ = seed_softmax_with_gradients(W, X, y, 0.0)
  assert seed_loss == np.inf
  expected = ref_loss(W, X, y)
  np.testing.assert_allclose(
      expected, (800.0 + np.log1p(np.exp(-800)) + np.log1p(np.exp(-1))) / 2,
      rtol=1e-14)
  loss = linear_softmax_loss(W.astype(np.float32), X.astype(np.float32), y)
  np.testing.assert_allclose(loss, expected, rtol=1e-7)


@pytest.mark.parametrize("offset", [1e3, 1e6])
def test_float32_gradient_at_large_logits(offset):
  """Logits that are exact in float32 but large: the gradient stays exact.

  ``p = exp(z - lse)`` with ``lse = m + log_s`` rounded to float32 loses
  ``|lse| * 2**-24`` in the exponent; ``exp((z - m) - log_s)`` does not.
  """
  W = np.eye(2, dtype=np.float32)  # noqa: N806
  X = np.array([[offset, offset + 0.5], [0.0, 1.0]], np.float32)  # noqa: N806
  y = np.array([0, 1])
  expected_w = ref_grad_w(W, X, y)
  d_w, d_x = jax.jit(jax.grad(linear_softmax_loss, argnums=(0, 1)))(W, X, y)
  with jax.enable_x64(True):
    e_x = jax.jit(jax.grad(plain_loss, argnums=1))(W.astype(np.float64),
                                                   X.astype(np.float64), y)
  np.testing.assert_allclose(d_x, e_x, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(d_w, expected_w, rtol=1e-6, atol=1e-7)


@settings(deadline=None, max_examples=25)
@given(st.integers(0, 2**16),
       st.lists(st.sampled_from([0.0, -3000.0, -1000.0, 800.0, 5000.0]),
                min_size=5, max_size=5))
def test_row_shifts_do_not_change_the_loss(seed, shifts):
  """Shifting one row's logits leaves its loss alone, whatever the others."""
  W, X, y = _problem(seed, n=5, d=3, c=4)  # noqa: N806
  W = np.concatenate([W, np.ones((1, 4))])  # noqa: N806
  X = np.concatenate([X, np.zeros((5, 1))], axis=1)  # noqa: N806
  expected = ref_loss(W, X, y, 0.1)
  X[:, -1] = shifts
  with jax.enable_x64(True):
    loss = linear_softmax_loss(W, X, y, 0.1)
    np.testing.assert_allclose(loss, expected, rtol=1e-11)


# --------------------------------------------------------------------------
# gradients


@pytest.mark.slow
@pytest.mark.parametrize("jit, dtype", [(False, np.float32),
                                        (True, np.float32),
                                        (True, np.float64)])
def test_grad_equals_dw(jit, dtype):
  W, X, y = _problem(5, dtype=dtype)  # noqa: N806
  grad = jax.grad(linear_softmax_loss)
  swg = softmax_with_gradients
  if jit:
    grad = jax.jit(grad)
  with jax.enable_x64(dtype == np.float64):
    g = grad(W, X, y, 0.3)
    loss, d_w = swg(W, X, y, 0.3)
    # the same computation, jitted or not: equal up to XLA's fusion
    same = 1e-15 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(g, d_w, rtol=same, atol=same)
    np.testing.assert_allclose(loss, linear_softmax_loss(W, X, y, 0.3),
                               rtol=same)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(d_w, ref_grad_w(W, X, y, 0.3), rtol=tol,
                               atol=tol)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(OPTIONS))
def test_value_and_grad_vs_plain(name):
  W, X, y, opts = _option_problem(name)  # noqa: N806
  expected = ref_loss(W, X, y, 0.2, **opts)
  with jax.enable_x64(True):
    jopts = _jnp_opts(opts)
    args = (jnp.asarray(W), jnp.asarray(X), jnp.asarray(y), jnp.asarray(0.2))

    def ours(w, x, reg):
      return linear_softmax_loss(w, x, args[2], reg, **jopts)

    def plain(w, x, reg):
      return plain_loss(w, x, args[2], reg, **jopts)

    v, g = jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2)))(
        args[0], args[1], args[3])
    pv, pg = jax.jit(jax.value_and_grad(plain, argnums=(0, 1, 2)))(
        args[0], args[1], args[3])
    np.testing.assert_allclose(v, expected, rtol=1e-13)
    np.testing.assert_allclose(pv, expected, rtol=1e-13)
    chex.assert_trees_all_close(g, pg, rtol=1e-11, atol=1e-14)
    chex.assert_trees_all_equal_dtypes(g, pg)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["plain", "all"])
def test_check_grads_reverse(name):
  W, X, y, opts = _option_problem(name, seed=3)  # noqa: N806
  with jax.enable_x64(True):
    jopts = _jnp_opts(opts)

    def f(w, x, reg):
      return linear_softmax_loss(w, x, y, reg, **jopts)

    check_grads(jax.jit(f), (W, X, 0.4), order=2, modes=["rev"])


def test_grad_float32_vs_float64_reference():
  W, X, y = _problem(11, n=40, d=10, c=7, dtype=np.float32)  # noqa: N806
  d_w, d_x = jax.jit(jax.grad(linear_softmax_loss, argnums=(0, 1)))(
      W, X, y, 0.1)
  with jax.enable_x64(True):
    e_w, e_x = jax.jit(jax.grad(plain_loss, argnums=(0, 1)))(
        W.astype(np.float64), X.astype(np.float64), y, 0.1)
  chex.assert_type([d_w, d_x], jnp.float32)
  np.testing.assert_allclose(d_w, e_w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(d_x, e_x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision(dtype):
  W, X, y = _problem(2, n=16, d=6, c=5)  # noqa: N806
  W, X = W.astype(dtype), X.astype(dtype)  # noqa: N806
  loss, (d_w, d_x) = jax.jit(jax.value_and_grad(linear_softmax_loss,
                                                argnums=(0, 1)))(W, X, y, 0.1)
  chex.assert_type(loss, jnp.float32)
  chex.assert_type([d_w, d_x], dtype)
  w64, x64 = np.asarray(W, np.float64), np.asarray(X, np.float64)
  np.testing.assert_allclose(loss, ref_loss(w64, x64, y, 0.1), rtol=1e-2)
  np.testing.assert_allclose(np.asarray(d_w, np.float64),
                             ref_grad_w(w64, x64, y, 0.1), rtol=5e-2,
                             atol=2e-2)


def test_forward_computes_x_at_w_once():
  W, X, y = _problem(0, dtype=np.float32)  # noqa: N806

  def dots(f):
    return str(jax.make_jaxpr(f)(W, X, y, 0.1)).count("dot_general")

  assert dots(linear_softmax_loss) == 1
  # forward X @ W, backward X^T dZ and dZ W^T
  assert dots(jax.value_and_grad(linear_softmax_loss, argnums=(0, 1))) == 3


# --------------------------------------------------------------------------
# masks and the mean over counted rows


def test_where_is_the_mean_over_counted_rows():
  W, X, y = _problem(4)  # noqa: N806
  keep = np.array([True, False, True, True, False, False, True, True, False,
                   True, True, False])
  with jax.enable_x64(True):
    vg = jax.jit(jax.value_and_grad(linear_softmax_loss, argnums=(0, 1)))
    masked, (g_w, g_x) = vg(W, X, y, 0.1, where=keep)
    subset, (s_w, _) = vg(W, X[keep], y[keep], 0.1)
    np.testing.assert_allclose(masked, subset, rtol=1e-14)
    np.testing.assert_allclose(g_w, s_w, rtol=1e-13, atol=1e-15)
    np.testing.assert_array_equal(g_x[~keep], 0.0)


def test_ignore_index_is_the_mean_over_counted_rows():
  W, X, y = _problem(5)  # noqa: N806
  y[[0, 5, 6]] = -100
  keep = y != -100
  with jax.enable_x64(True):
    ignored = linear_softmax_loss(W, X, y, ignore_index=-100)
    subset = jax.jit(linear_softmax_loss)(W, X[keep], y[keep])
    np.testing.assert_allclose(ignored, subset, rtol=1e-14)
    g_x = jax.jit(jax.grad(linear_softmax_loss, argnums=1),
                  static_argnames="ignore_index")(W, X, y, ignore_index=-100)
    np.testing.assert_array_equal(g_x[~keep], 0.0)


def test_class_weights_mean_divides_by_summed_weights():
  W, X, y = _problem(6)  # noqa: N806
  cw = np.array([0.5, 2.0, 1.0, 3.0])
  with jax.enable_x64(True):
    one_row = jax.jit(linear_softmax_loss)
    per_row = jnp.stack([one_row(W, X[i:i + 1], y[i:i + 1])
                         for i in range(len(y))])
    expected = jnp.sum(cw[y] * per_row) / np.sum(cw[y])
    got = linear_softmax_loss(W, X, y, class_weights=cw)
    np.testing.assert_allclose(got, expected, rtol=1e-13)


def test_all_rows_masked_leaves_the_penalty():
  W, X, y = _problem(8)  # noqa: N806
  with jax.enable_x64(True):
    none = np.zeros(len(y), bool)
    loss, g = jax.jit(jax.value_and_grad(linear_softmax_loss))(
        W, X, y, 0.5, where=none)
    np.testing.assert_allclose(loss, 0.5 * np.sum(W * W), rtol=1e-15)
    np.testing.assert_allclose(g, W, rtol=1e-15)


def test_masked_row_contents_do_not_matter():
  """A masked (padding) row's label and features change nothing.

  The masked row's contribution to the loss is 0 whatever it holds, so the
  gradients must not see it either (``0 * nan`` in ``X^T dZ`` would).
  """
  W, X, y = _problem(9, dtype=np.float32)  # noqa: N806
  keep = np.ones(len(y), bool)
  keep[4] = False
  vg = jax.jit(jax.value_and_grad(linear_softmax_loss, argnums=(0, 1)))
  clean = vg(W, X, y, 0.1, where=keep)
  y_bad = y.copy()
  y_bad[4] = 99
  loss, _ = vg(W, X, y_bad, 0.1, where=keep)
  np.testing.assert_array_equal(loss, clean[0])
  for bad in (np.nan, np.inf):
    x_bad = X.copy()
    x_bad[4] = bad
    loss, (g_w, g_x) = vg(W, x_bad, y, 0.1, where=keep)
    np.testing.assert_array_equal(loss, clean[0])
    np.testing.assert_array_equal(g_x[4], 0.0)
    np.testing.assert_allclose(g_w, clean[1][0], rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------
# vmap


def test_vmap_over_an_ensemble_of_weights():
  _, X, y = _problem(10)  # noqa: N806
  Ws = np.random.default_rng(1).standard_normal((6, 5, 4))  # noqa: N806
  regs = np.linspace(0.0, 0.5, 6)
  with jax.enable_x64(True):
    loss = jax.jit(jax.vmap(linear_softmax_loss,
                            in_axes=(0, None, None, None)))(Ws, X, y, 0.1)
    losses, d_ws = jax.vmap(softmax_with_gradients,
                            in_axes=(0, None, None, 0))(Ws, X, y, regs)
    chex.assert_shape(loss, (6,))
    chex.assert_shape(d_ws, (6, 5, 4))
    for i in range(6):
      np.testing.assert_allclose(loss[i], ref_loss(Ws[i], X, y, 0.1),
                                 rtol=1e-13)
      np.testing.assert_allclose(losses[i], ref_loss(Ws[i], X, y, regs[i]),
                                 rtol=1e-13)
      np.testing.assert_allclose(d_ws[i], ref_grad_w(Ws[i], X, y, regs[i]),
                                 rtol=1e-12, atol=1e-15)


def test_vmap_over_batches():
  W, _, _ = _problem(11)  # noqa: N806
  rng = np.random.default_rng(2)
  Xs = rng.standard_normal((3, 12, 5))  # noqa: N806
  ys = rng.integers(0, 4, (3, 12)).astype(np.int32)
  masks = rng.random((3, 12)) < 0.7
  with jax.enable_x64(True):

    def f(w, x, y, m):
      return linear_softmax_loss(w, x, y, 0.2, where=m)

    vg = jax.value_and_grad(f, argnums=(0, 1))
    vals, (g_w, g_x) = jax.jit(jax.vmap(vg, in_axes=(None, 0, 0, 0)))(
        W, Xs, ys, masks)
    loop = [jax.jit(vg)(W, Xs[i], ys[i], masks[i]) for i in range(3)]
    for i in range(3):
      np.testing.assert_allclose(vals[i], ref_loss(W, Xs[i], ys[i], 0.2,
                                                   where=masks[i]),
                                 rtol=1e-13)
      chex.assert_trees_all_close((vals[i], g_w[i], g_x[i]),
                                  (loop[i][0], *loop[i][1]), rtol=1e-13,
                                  atol=1e-15)


# --------------------------------------------------------------------------
# second order: Hessians, Hessian-vector products, hypergradients


@pytest.mark.slow
@pytest.mark.parametrize("name", ["plain", "where", "class_weights",
                                  "label_smoothing", "all"])
def test_hessian_reverse_over_reverse(name):
  W, X, y, opts = _option_problem(name, seed=12)  # noqa: N806
  with jax.enable_x64(True):
    jopts = _jnp_opts(opts)

    def ours(w):
      return linear_softmax_loss(w, X, y, 0.3, **jopts)

    def plain(w):
      return plain_loss(w, X, y, 0.3, **jopts)

    h = jax.jit(jax.jacrev(jax.grad(ours)))(W)
    chex.assert_shape(h, W.shape + W.shape)
    chex.assert_trees_all_close(h, jax.jit(jax.hessian(plain))(W),
                                rtol=1e-10, atol=1e-13)
    flat = h.reshape(W.size, W.size)
    np.testing.assert_allclose(flat, flat.T, rtol=1e-12, atol=1e-14)


def test_mixed_second_derivatives():
  """d/dX and d/dreg of grad_W (influence functions, hypergradients)."""
  W, X, y = _problem(13, n=6, d=3, c=4)  # noqa: N806
  with jax.enable_x64(True):

    @jax.jit
    def ours(w, x, reg):
      jac = jax.jacrev(jax.grad(linear_softmax_loss), argnums=(1, 3))(
          w, x, y, reg)
      h_xx = jax.jacrev(jax.grad(linear_softmax_loss, argnums=1), argnums=1)(
          w, x, y, reg)
      return jac, h_xx

    @jax.jit
    def plain(w, x, reg):
      jac = jax.jacfwd(jax.grad(plain_loss), argnums=(1, 3))(w, x, y, reg)
      return jac, jax.hessian(plain_loss, argnums=1)(w, x, y, reg)

    got = ours(W, X, 0.3)
    chex.assert_trees_all_close(got, plain(W, X, 0.3), rtol=1e-10,
                                atol=1e-13)
    np.testing.assert_allclose(got[0][1], 2 * W, rtol=1e-15)


@pytest.mark.parametrize("name", ["plain", "all"])
def test_hessian_vector_product(name):
  W, X, y, opts = _option_problem(name, seed=14)  # noqa: N806
  v = np.random.default_rng(0).standard_normal(W.shape)
  with jax.enable_x64(True):
    jopts = _jnp_opts(opts)

    def ours(w):
      return linear_softmax_loss(w, X, y, 0.1, **jopts)

    def plain(w):
      return plain_loss(w, X, y, 0.1, **jopts)

    def hvp(w, v):  # the README recipe: grad of <grad f, v>
      return jax.grad(lambda w: jnp.vdot(jax.grad(ours)(w), v))(w)

    got = jax.jit(hvp)(W, v)
    expected = jax.jit(lambda w, v: jax.jvp(jax.grad(plain), (w,), (v,))[1])(
        W, v)
    np.testing.assert_allclose(got, expected, rtol=1e-11, atol=1e-14)
    h = jax.jit(jax.jacrev(jax.grad(ours)))(W).reshape(W.size, W.size)
    np.testing.assert_allclose(got.ravel(), h @ v.ravel(), rtol=1e-11,
                               atol=1e-14)


def test_forward_mode_is_not_supported():
  W, X, y = _problem(0, dtype=np.float32)  # noqa: N806
  with pytest.raises(TypeError, match="custom_vjp"):
    jax.jvp(lambda w: linear_softmax_loss(w, X, y), (W,), (W,))


def test_newton_converges():
  """Newton steps with the reverse-over-reverse Hessian reach grad = 0."""
  W, X, y = _problem(15, n=30, d=4, c=3)  # noqa: N806
  with jax.enable_x64(True):

    def f(w):
      return linear_softmax_loss(w, X, y, 0.05)

    @jax.jit
    def newton(w):
      h = jax.jacrev(jax.grad(f))(w).reshape(w.size, w.size)
      return w - jnp.linalg.solve(h, jax.grad(f)(w).ravel()).reshape(w.shape)

    w = jnp.zeros_like(W)
    for _ in range(12):
      w = newton(w)
    assert float(jnp.max(jnp.abs(jax.jit(jax.grad(f))(w)))) < 1e-12


# --------------------------------------------------------------------------
# reg: traced and exact


def test_reg_traced_under_jit_gradient_is_sum_of_squares():
  W, X, y = _problem(16, dtype=np.float32)  # noqa: N806

  @jax.jit
  def f(w, reg):
    return linear_softmax_loss(w, X, y, reg)

  for reg in (0.0, 0.01, 2.0):
    g = jax.jit(jax.grad(f, argnums=1))(W, reg)
    chex.assert_type(g, jnp.float32)
    np.testing.assert_allclose(g, np.sum(W.astype(np.float64) ** 2),
                               rtol=1e-6)
    np.testing.assert_allclose(
        f(W, reg) - f(W, 0.0), reg * np.sum(W.astype(np.float64) ** 2),
        rtol=1e-5, atol=1e-6)
  with jax.enable_x64(True):
    w64 = W.astype(np.float64)
    g = jax.jit(jax.grad(linear_softmax_loss, argnums=3))(w64, X, y, 0.7)
    np.testing.assert_allclose(g, np.sum(w64 * w64), rtol=1e-15)


@pytest.mark.parametrize("reg", [0.0, 1e-10, -1e-10])
def test_penalty_of_a_weight_whose_square_overflows(reg):
  # |W| = 2e19: W**2 = 4e38 overflows float32. reg = 0 gave 0 * inf = NaN,
  # reg = 1e-10 inf, where reg * sum W**2 = 4e28 is representable.
  W = np.array([[2e19, 0.0], [0.0, 1.0]], np.float32)  # noqa: N806
  X = np.array([[0.0, 1.0], [0.0, 2.0]], np.float32)  # noqa: N806
  y = np.array([1, 0])
  want = ref_loss(W, X, y, reg)
  assert np.isfinite(want)
  np.testing.assert_allclose(linear_softmax_loss(W, X, y, reg), want,
                             rtol=1e-6)
  np.testing.assert_allclose(softmax_with_gradients(W, X, y, reg)[0], want,
                             rtol=1e-6)
  d_w = jax.grad(linear_softmax_loss)(jnp.asarray(W), X, y, reg)
  np.testing.assert_allclose(d_w, ref_grad_w(W, X, y, reg), rtol=1e-6)


def test_reg_schedule_and_hypergradient():
  """reg from a schedule inside a jitted loop, tuned by differentiation."""
  W, X, y = _problem(17)  # noqa: N806
  with jax.enable_x64(True):

    def train(reg0, loss_fn):
      def body(t, w):
        reg = reg0 * 0.5 ** t
        return w - 0.5 * jax.grad(loss_fn)(w, X, y, reg)
      w = jax.lax.fori_loop(0, 5, body, jnp.asarray(W))
      return loss_fn(w, X, y, 0.0)

    ours = jax.jit(jax.value_and_grad(
        lambda r: train(r, linear_softmax_loss)))(0.3)
    plain = jax.jit(jax.value_and_grad(lambda r: train(r, plain_loss)))(0.3)
    chex.assert_trees_all_close(ours, plain, rtol=1e-11, atol=1e-14)


# --------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("w_shape, x_shape, y_shape", [
    ((5,), (12, 5), (12,)),
    ((5, 4, 1), (12, 5), (12,)),
    ((5, 4), (12,), (12,)),
    ((5, 4), (12, 6), (12,)),
    ((5, 4), (5, 12), (12,)),
    ((5, 4), (12, 5), (11,)),
    ((5, 4), (12, 5), (12, 1)),
])
@pytest.mark.parametrize("fn", ["linear_softmax_loss",
                                "softmax_with_gradients"])
def test_wrong_shapes_raise(w_shape, x_shape, y_shape, fn):
  with pytest.raises(ValueError, match="shape"):
    getattr(js, fn)(np.zeros(w_shape, np.float32),
                    np.zeros(x_shape, np.float32),
                    np.zeros(y_shape, np.int32), 0.0)


@pytest.mark.parametrize("fn", ["linear_softmax_loss",
                                "softmax_with_gradients"])
@pytest.mark.parametrize("which", ["W", "X", "y", "reg"])
def test_wrong_dtypes_and_values_raise(which, fn):
  # softmax_with_gradients checks as linear_softmax_loss does (it once
  # took a transposed W's class count for a bad label, and a NaN reg).
  args = {"W": np.zeros((5, 4), np.float32), "X": np.zeros((3, 5), np.float32),
          "y": np.zeros(3, np.int32), "reg": 0.0}
  if which == "reg":
    for bad in (np.nan, np.inf):
      with pytest.raises(ValueError, match="reg must be finite; got"):
        getattr(js, fn)(args["W"], args["X"], args["y"], bad)
    return
  args[which] = args[which].astype(np.float32 if which == "y" else np.int32)
  with pytest.raises(TypeError, match=which):
    getattr(js, fn)(args["W"], args["X"], args["y"], args["reg"])


def test_bad_option_arguments_raise():
  W, X, y = _problem(0, dtype=np.float32)  # noqa: N806
  with pytest.raises(TypeError, match="where"):
    linear_softmax_loss(W, X, y, where=np.ones(12, np.int32))
  with pytest.raises(ValueError, match="where"):
    linear_softmax_loss(W, X, y, where=np.ones(5, bool))
  with pytest.raises(ValueError, match="class_weights"):
    linear_softmax_loss(W, X, y, class_weights=np.ones(3, np.float32))
  with pytest.raises(ValueError, match="label_smoothing"):
    linear_softmax_loss(W, X, y, label_smoothing=np.full(2, 0.1))


@pytest.mark.parametrize("label, pos", [(4, 2), (-1, 9), (1000, 0)])
def test_bad_concrete_label_names_label_and_position(label, pos):
  W, X, y = _problem(0, dtype=np.float32)  # noqa: N806
  y[pos] = label
  with pytest.raises(ValueError, match=rf"label {label} at position \({pos},"):
    linear_softmax_loss(W, X, y)


def test_labels_that_are_not_counted_are_not_checked():
  W, X, y = _problem(0, dtype=np.float32)  # noqa: N806
  y[3] = -100
  assert np.isfinite(linear_softmax_loss(W, X, y, ignore_index=-100))
  y[5] = 7
  with pytest.raises(ValueError, match=r"label 7 at position \(5,\).*"
                     "ignore_index=-100"):
    linear_softmax_loss(W, X, y, ignore_index=-100)
  keep = np.ones(12, bool)
  keep[[3, 5]] = False
  assert np.isfinite(linear_softmax_loss(W, X, y, where=keep))


def test_traced_bad_label_gives_nan():
  W, X, y = _problem(0, dtype=np.float32)  # noqa: N806
  y[1] = 4
  loss, g = jax.jit(jax.value_and_grad(linear_softmax_loss))(W, X, y, 0.1)
  assert np.isnan(loss)
  assert np.isnan(g).any()


# --------------------------------------------------------------------------
# a real data set against an established solver


@pytest.mark.slow
def test_digits_lbfgs_matches_sklearn():
  from sklearn.datasets import load_digits
  from sklearn.exceptions import ConvergenceWarning
  from sklearn.linear_model import LogisticRegression
  from sklearn.preprocessing import StandardScaler

  X, y = load_digits(return_X_y=True)  # noqa: N806
  X = StandardScaler().fit_transform(X)  # noqa: N806
  n, d = X.shape
  c = 10
  reg = 1e-2
  with warnings.catch_warnings():
    # A tolerance this small may end on a ConvergenceWarning once lbfgs
    # stalls at round-off; the objective comparison below is the check.
    warnings.simplefilter("ignore", ConvergenceWarning)
    clf = LogisticRegression(C=1.0 / (2 * reg * n), fit_intercept=False,
                             tol=1e-12, max_iter=10_000, solver="lbfgs")
    clf.fit(X, y)
  assert clf.coef_.shape == (c, d)

  with jax.enable_x64(True):
    x = jnp.asarray(X)
    labels = jnp.asarray(y, jnp.int32)

    def objective(w):
      return linear_softmax_loss(w, x, labels, reg)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    @jax.jit
    def solve(w):
      def step(carry):
        w, state = carry
        value, grad = value_and_grad(w, state=state)
        updates, state = opt.update(grad, state, w, value=value, grad=grad,
                                    value_fn=objective)
        return optax.apply_updates(w, updates), state

      def keep_going(carry):
        _, state = carry
        count = optax.tree.get(state, "count")
        grad = optax.tree.get(state, "grad")
        return (count == 0) | ((count < 500) & (optax.tree.norm(grad) > 1e-11))

      return jax.lax.while_loop(keep_going, step, (w, opt.init(w)))

    w, state = solve(jnp.zeros((d, c)))
    ours = float(objective(w))
    theirs = float(objective(jnp.asarray(clf.coef_.T)))
    grad_norm = float(optax.tree.norm(jax.jit(jax.grad(objective))(w)))

  assert grad_norm < 1e-8, grad_norm
  assert abs(ours - theirs) <= 1e-6 * abs(theirs), (ours, theirs)
  assert ours <= theirs + 1e-12, (ours, theirs)
  # strictly convex: one minimiser
  np.testing.assert_allclose(w, clf.coef_.T, atol=1e-5)


def test_nested_list_inputs_give_arrays():
  # The seed's inputs as nested lists: dW came back as a list of lists of
  # scalars (W's pytree), not an array of W's shape.
  W, X, y = [[0.5, -0.5], [0.0, 1.0]], [[1.0, 2.0], [3.0, -1.0]], [0, 1]
  loss, dW = softmax_with_gradients(W, X, y, 0.1)
  want_loss, want_dW = softmax_with_gradients(np.array(W, np.float32),
                                              np.array(X, np.float32),
                                              np.array(y), 0.1)
  assert isinstance(dW, jax.Array) and dW.shape == (2, 2)
  np.testing.assert_array_equal(dW, want_dW)
  np.testing.assert_array_equal(loss, want_loss)
  # float64 reference of the seed's math: mean NLL + reg * sum(W ** 2).
  Wn, Xn = np.array(W), np.array(X)
  z = Xn @ Wn
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  onehot = np.eye(2)[y]
  np.testing.assert_allclose(dW, Xn.T @ (p - onehot) / 2 + 0.2 * Wn,
                             rtol=1e-6, atol=1e-7)
