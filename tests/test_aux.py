"""return_aux: per-row lse, entropy, argmax, correct, differentiable."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_softmax as js

B, D, V = 10, 6, 23


def _data():
  k = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(k[0], (B, D))
  w = 2 * jax.random.normal(k[1], (D, V))
  y = jax.random.randint(k[2], (B,), 0, V).at[0].set(-1)
  return x, w, y


def _plain_aux(z, cap=None, cmask=None):
  """float64 NumPy lse, entropy, argmax of the raw logits."""
  z = np.asarray(z, np.float64)
  zc = z if cap is None else cap * np.tanh(z / cap)
  if cmask is not None:
    zc = np.where(cmask, zc, -np.inf)
    z = np.where(cmask, z, -np.inf)
  m = zc.max(-1, keepdims=True)
  e = np.exp(zc - m)
  lse = np.log(e.sum(-1)) + m[:, 0]
  p = e / e.sum(-1, keepdims=True)
  logp = np.where(p > 0, zc - lse[:, None], 0.0)
  return lse, -(p * logp).sum(-1), z.argmax(-1)


def _jnp_aux(z, cap):
  zc = cap * jnp.tanh(z / cap)
  lse = jax.nn.logsumexp(zc, axis=-1)
  lp = jax.nn.log_softmax(zc)
  return lse, -jnp.sum(jnp.exp(lp) * lp, axis=-1)


@pytest.mark.slow
def test_values_on_every_row_including_ignored():
  x, w, y = _data()
  z = x @ w
  loss, aux = js.cross_entropy(z, y, ignore_index=-1, return_aux=True)
  lse, ent, top = _plain_aux(z)
  chex.assert_shape([aux.lse, aux.entropy, aux.argmax, aux.correct], (B,))
  np.testing.assert_allclose(aux.lse, lse, rtol=1e-6)
  np.testing.assert_allclose(aux.entropy, ent, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(aux.argmax, top)
  want_correct = (top == np.asarray(y)) & (np.asarray(y) != -1)
  np.testing.assert_array_equal(aux.correct, want_correct)
  assert float(loss) == float(js.cross_entropy(z, y, ignore_index=-1))


def test_correct_for_probability_targets_and_class_mask():
  x, w, _ = _data()
  z = x @ w
  t = jax.nn.softmax(jnp.roll(z, 1, axis=0))
  cmask = jnp.arange(V)[None, :] % 3 != 0
  cmask = jnp.broadcast_to(cmask, z.shape)
  _, aux = js.cross_entropy(z, t, where=cmask, return_aux=True)
  lse, ent, top = _plain_aux(z, cmask=np.asarray(cmask))
  np.testing.assert_allclose(aux.lse, lse, rtol=1e-6)
  np.testing.assert_allclose(aux.entropy, ent, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(aux.argmax, top)
  np.testing.assert_array_equal(aux.correct,
                                top == np.asarray(t).argmax(-1))


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("fused", [False, True])
def test_aux_gradients_equal_plain_autodiff(reduction, fused):
  x, w, y = _data()
  where = jnp.arange(B) != 3
  cap = 4.0

  def ours(x, w):
    kw = dict(where=where, ignore_index=-1, soft_cap=cap,
              reduction=reduction, return_aux=True)
    if fused:
      loss, aux = js.linear_cross_entropy(x, w, y, chunk_size=4, **kw)
    else:
      loss, aux = js.cross_entropy(x @ w, y, **kw)
    return (jnp.sum(loss) + 1e-1 * jnp.mean(aux.lse ** 2)
            - 0.3 * jnp.mean(aux.entropy))

  def plain(x, w):
    z = x @ w
    loss = js.cross_entropy(z, y, where=where, ignore_index=-1,
                            soft_cap=cap, reduction=reduction)
    lse, ent = _jnp_aux(z, cap)
    return jnp.sum(loss) + 1e-1 * jnp.mean(lse ** 2) - 0.3 * jnp.mean(ent)

  got = jax.value_and_grad(ours, (0, 1))(x, w)
  want = jax.value_and_grad(plain, (0, 1))(x, w)
  chex.assert_trees_all_close(got, want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("fused", [False, True])
def test_aux_rows_left_out_of_a_metric_give_no_gradient(bad, fused):
  # Row 0 is ignored and holds NaN/inf; a metric of the other rows' aux
  # (zero cotangent on row 0) leaves every gradient, the temperature's and
  # the cap's included, as for a clean row 0.
  x, w, y = _data()
  if not fused:   # the logits hold the bad row (x @ w's dw would see it)
    x, w = x @ w, None

  def f(x, w, t, cap):
    kw = dict(ignore_index=-1, temperature=t, soft_cap=cap,
              return_aux=True)
    if fused:
      loss, aux = js.linear_cross_entropy(x, w, y, chunk_size=4, **kw)
    else:
      loss, aux = js.cross_entropy(x, y, **kw)
    return loss - 0.3 * jnp.mean(aux.entropy[1:]) + 0.1 * aux.lse[2]

  grad = jax.value_and_grad(f, (0, 1, 2, 3) if fused else (0, 2, 3))
  got = grad(x.at[0].set(bad), w, 0.9, 4.0)
  want = grad(x.at[0].set(0.0), w, 0.9, 4.0)
  chex.assert_tree_all_finite(want)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1][0][0], 0.0)
  np.testing.assert_array_equal(got[1][0][1:], want[1][0][1:])
  chex.assert_trees_all_close(got[1][1:], want[1][1:], rtol=1e-6)


def test_fused_aux_equals_cross_entropy_aux_and_vmap():
  x, w, y = _data()
  _, got = js.linear_cross_entropy(x, w, y, ignore_index=-1, chunk_size=3,
                                   return_aux=True)
  _, want = js.cross_entropy(x @ w, y, ignore_index=-1, return_aux=True)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
  xs, ys = x.reshape(2, 5, D), jnp.clip(y, 0).reshape(2, 5)
  _, batched = jax.vmap(lambda a, b: js.linear_cross_entropy(
      a, w, b, return_aux=True))(xs, ys)
  chex.assert_shape(batched.lse, (2, 5))
  np.testing.assert_allclose(batched.lse.reshape(-1), want.lse, rtol=1e-6)


@pytest.mark.slow
def test_undifferentiated_aux_keeps_three_matmuls():
  x, w, y = _data()

  def dots(f):
    text = jax.jit(f).lower(x, w).compile().as_text()
    return len(re.findall(r" dot\(", text))

  def loss_only(x, w):
    return js.linear_cross_entropy(x, w, y, ignore_index=-1, chunk_size=4,
                                   return_aux=True)[0]

  def entropy_bonus(x, w):
    loss, aux = js.linear_cross_entropy(x, w, y, ignore_index=-1,
                                        chunk_size=4, return_aux=True)
    return loss - 0.01 * jnp.mean(aux.entropy)

  metrics = jax.value_and_grad(
      lambda x, w: js.linear_cross_entropy(x, w, y, ignore_index=-1,
                                           chunk_size=4, return_aux=True),
      (0, 1), has_aux=True)
  assert dots(jax.value_and_grad(loss_only, (0, 1))) == 3
  assert dots(metrics) == 3
  # A differentiated entropy adds one recomputing sweep: 1 + 2 more dots.
  assert dots(jax.value_and_grad(entropy_bonus, (0, 1))) == 6
