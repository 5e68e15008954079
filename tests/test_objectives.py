"""Post-training objectives, per-row weights and temperature.

``log_prob_objective`` / ``linear_log_prob_objective`` against plain
``jax.grad`` of the same objective on materialized logits (computed under
``jax.enable_x64`` from the float32 inputs, so it is a float64 reference
of the rounded inputs and ``TOL`` applies) and, for values, against a
float64 NumPy reference written here. ``weights=`` and ``temperature=`` of
the cross-entropies against tests/reference.py, weighted per row here.
"""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from helpers import (
  as_float64,
  assert_close,
  compile_jit,
  finite_scale,
  op_counts,
)

import jax_softmax as js

B, D, V = 12, 8, 37  # chunks of 4 divide the batch, chunks of 5 do not
IGNORED, MASKED_ROW, MASKED_VOCAB = 3, 7, 5
UNCOUNTED = (IGNORED, MASKED_ROW)
WHERE = np.arange(B) != MASKED_ROW
COT = np.linspace(-1.0, 1.5, B)  # cotangent of the per-row values


def _data(dtype=jnp.float32, b=B, seed=0):
  """``(x, emb (V, d), bias with a -inf entry, labels with one ignored,
  adv, noise)``."""
  k = jax.random.split(jax.random.key(seed), 6)
  x = jax.random.normal(k[0], (b, D), dtype)
  emb = (0.7 * jax.random.normal(k[1], (V, D))).astype(dtype)
  bias = jax.random.normal(k[2], (V,), dtype).at[MASKED_VOCAB].set(-jnp.inf)
  y = jax.random.randint(k[3], (b,), 0, V)
  y = jnp.where(y == MASKED_VOCAB, MASKED_VOCAB + 1, y)
  y = y.at[IGNORED % b].set(-100)
  adv = jax.random.normal(k[4], (b,))
  noise = 0.3 * jax.random.normal(k[5], (b,))
  return x, emb, bias, y, adv, noise


# --------------------------------------------------------------------------
# objectives: jnp (for the library and plain autodiff) and NumPy versions


def ppo(logp, entropy, old_logp, adv):
  ratio = jnp.exp(logp - old_logp)
  return -jnp.minimum(ratio * adv, jnp.clip(ratio, 0.8, 1.2) * adv) - 0.01 * entropy  # noqa: E501


def ppo_np(logp, entropy, old_logp, adv):
  ratio = np.exp(logp - old_logp)
  return (-np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv)
          - 0.01 * entropy)


def trailing(logp, entropy, ab):
  """fn_args of shape (rows, 2)."""
  return jnp.tanh(ab[:, 0]) * jnp.exp(logp) - ab[:, 1] * logp + 0.1 * entropy


def trailing_np(logp, entropy, ab):
  return np.tanh(ab[:, 0]) * np.exp(logp) - ab[:, 1] * logp + 0.1 * entropy


def entropy_only(logp, entropy):
  return 0.5 * entropy ** 2 - entropy


def entropy_only_np(logp, entropy):
  return 0.5 * entropy ** 2 - entropy


NUMPY = {ppo: ppo_np, trailing: trailing_np, entropy_only: entropy_only_np}


def _fn_args(fn, y, adv, noise, logp_ref):
  """The fn_args of ``fn``: PPO's old log-probabilities near the current
  ones (ratios on both sides of the clip range)."""
  if fn is ppo:
    return (jnp.asarray(logp_ref + noise, jnp.float32), adv)
  if fn is trailing:
    return (jnp.stack([adv, 1.0 + noise], axis=-1),)
  return ()


# --------------------------------------------------------------------------
# references


def _ref_rows(z, y, t=1.0):
  """float64 ``(log p_y, entropy)`` of softmax(z / t) per row."""
  zt = as_float64(z) / float(t)
  m = np.max(zt, axis=-1, keepdims=True)
  logp = zt - (m + np.log(np.sum(np.exp(zt - m), axis=-1, keepdims=True)))
  p = np.exp(logp)
  ent = -np.sum(p * np.where(p > 0, logp, 0.0), axis=-1)
  yc = np.clip(np.asarray(y), 0, None)
  return logp[np.arange(len(yc)), yc], ent


def _counted(y, where=None, ignore_index=-100):
  counted = np.asarray(y) != ignore_index
  return counted if where is None else counted & np.asarray(where)


def ref_objective(z, y, fn, fn_args, where=None, t=1.0, reduction="mean"):
  """The NumPy float64 objective of (n, V) logits."""
  lp, ent = _ref_rows(z, y, t)
  counted = _counted(y, where)
  args = [as_float64(a) for a in fn_args]
  f = np.where(counted, NUMPY[fn](lp, ent, *args), 0.0)
  if reduction == "none":
    return f
  if reduction == "sum":
    return np.sum(f)
  return np.sum(f) / max(np.sum(counted), 1)


def plain_objective(z, y, fn, fn_args, where=None, t=1.0, reduction="mean"):
  """The objective by plain autodiff of jax.nn.log_softmax (any dtype).
  A -inf logit stays -inf without a NaN in d / d t (-inf * 0)."""
  finite = jnp.isfinite(z)
  zt = jnp.where(finite, jnp.where(finite, z, 0.0) / t, z)
  logp = jax.nn.log_softmax(zt, axis=-1)
  safe = jnp.where(jnp.isfinite(logp), logp, 0.0)
  ent = -jnp.sum(jnp.exp(logp) * safe, axis=-1)
  lp = jnp.take_along_axis(logp, jnp.clip(y, 0)[:, None], axis=-1)[:, 0]
  counted = y != -100
  if where is not None:
    counted = counted & where
  args = [jnp.where(counted.reshape(counted.shape + (1,) * (a.ndim - 1)),
                    a, 0.0) for a in fn_args]
  f = jnp.where(counted, fn(jnp.where(counted, lp, 0.0),
                            jnp.where(counted, ent, 0.0), *args), 0.0)
  if reduction == "none":
    return f
  if reduction == "sum":
    return jnp.sum(f)
  return jnp.sum(f) / jnp.maximum(jnp.sum(counted), 1)


def _scalar(f, reduction, cot=COT):
  """``f``'s value, or ``sum(f * cot)`` for "none" (cot cast to f's)."""
  def g(*args):
    out = f(*args)
    if reduction != "none":
      return out
    return jnp.sum(out * jnp.asarray(cot, out.dtype))
  return g


def _x64_value_and_grad(f, args, argnums):
  """``value_and_grad`` of ``f`` on ``args`` in float64, as NumPy."""
  with jax.enable_x64(True):
    args64 = jax.tree.map(
        lambda a: jnp.asarray(as_float64(a)) if jnp.issubdtype(
            jnp.asarray(a).dtype, jnp.floating) else jnp.asarray(a), args)
    out = jax.jit(jax.value_and_grad(f, argnums))(*args64)
    return jax.tree.map(np.asarray, out)


def _assert_tree_close(got, want, dtype):
  """Leaf by leaf within ``TOL[dtype]``, atol scaled by each leaf's size."""
  got, want = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(got) == len(want)
  for i, (g, w) in enumerate(zip(got, want, strict=True)):
    try:
      assert_close(as_float64(g), w, dtype, finite_scale(w))
    except AssertionError as e:
      raise AssertionError(f"leaf {i}: {e}") from None


def _linear_logits(x, w, bias, w_layout):
  z = x @ (w.T if w_layout == "vd" else w)
  return z if bias is None else z + bias[None, :]


# --------------------------------------------------------------------------
# 1. the PPO example


def test_ppo_example_equals_plain_autodiff_and_reference():
  h, emb, _, tokens, adv, noise = _data()
  tokens = jnp.where(tokens < 0, 0, tokens)
  logp_ref, ent_ref = _ref_rows(np.asarray(h, np.float64)
                                @ np.asarray(emb, np.float64).T, tokens)
  old_logp = jnp.asarray(logp_ref + noise, jnp.float32)
  ratio = np.exp(logp_ref - as_float64(old_logp))
  assert np.any(ratio < 0.8) and np.any(ratio > 1.2)
  assert np.any((ratio > 0.8) & (ratio < 1.2))

  def objective(h, emb, old_logp, adv):
    loss = js.linear_log_prob_objective(h, emb, tokens, ppo, (old_logp, adv), w_layout="vd")  # noqa: E501
    return loss

  def plain(h, emb, old_logp, adv):
    return plain_objective(h @ emb.T, tokens, ppo, (old_logp, adv))

  args = (h, emb, old_logp, adv)
  got = jax.jit(jax.value_and_grad(objective, (0, 1, 2, 3)))(*args)
  want = _x64_value_and_grad(plain, args, (0, 1, 2, 3))
  chex.assert_shape(got[0], ())
  chex.assert_trees_all_equal_shapes_and_dtypes(got[1], args)
  _assert_tree_close(got, want, jnp.float32)
  # Values against the NumPy formula in float64.
  want_np = np.mean(ppo_np(logp_ref, ent_ref, as_float64(old_logp),
                           as_float64(adv)))
  assert_close(got[0], want_np, jnp.float32)
  assert_close(objective(*args), want_np, jnp.float32)  # eager


# --------------------------------------------------------------------------
# 2. the matrix: reductions, masks, chunks, layouts, bias, temperature

# (reduction, chunk, w_layout, fn, temperature); "traced" differentiates it.
LINEAR_CASES = [
    ("mean", 4, "dv", ppo, "traced"),
    ("mean", 5, "vd", trailing, 0.7),
    ("mean", 5, "dv", entropy_only, 1.0),
    ("sum", 5, "dv", entropy_only, "traced"),
    ("sum", 4, "vd", ppo, 0.7),
    ("none", 5, "vd", trailing, "traced"),
    ("none", 4, "dv", ppo, 1.0),
]
LOGIT_CASES = [
    ("mean", ppo, "traced"),
    ("mean", trailing, 1.0),
    ("sum", trailing, 0.7),
    ("none", entropy_only, "traced"),
    ("none", ppo, 0.7),
]
T_TRACED = 0.8


def _case_args(fn, t):
  x, emb, bias, y, adv, noise = _data()
  z = as_float64(x) @ as_float64(emb).T + as_float64(bias)[None, :]
  logp_ref, _ = _ref_rows(z, y, T_TRACED if t == "traced" else t)
  args = _fn_args(fn, y, adv, noise, logp_ref)
  return x, emb, bias, y, args, z


def _check_uncounted(out, grads, reduction):
  """Uncounted rows: value 0 and exactly 0 gradient (first grad: the rows
  of x or logits; then the fn_args)."""
  if reduction == "none":
    np.testing.assert_array_equal(np.asarray(out)[list(UNCOUNTED)], 0.0)
  for g in [grads[0], *grads[-1]]:
    np.testing.assert_array_equal(np.asarray(g)[list(UNCOUNTED)], 0.0)
  assert np.all(np.any(np.asarray(grads[0]) != 0, axis=-1)[
      np.asarray(WHERE) & (np.arange(B) != IGNORED)])


@pytest.mark.parametrize(("reduction", "chunk", "w_layout", "fn", "t"),
                         LINEAR_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-{c[3].__name__}-{c[4]}"
                              for c in LINEAR_CASES])
def test_linear_objective_matrix(reduction, chunk, w_layout, fn, t):
  x, emb, bias, y, fn_args, z = _case_args(fn, t)
  w = emb if w_layout == "vd" else emb.T
  traced = t == "traced"
  where = jnp.asarray(WHERE)

  def lib(x, w, bias, fn_args, t):
    return js.linear_log_prob_objective(
        x, w, y, fn, fn_args, bias=bias, where=where, temperature=t,
        reduction=reduction, chunk_size=chunk, w_layout=w_layout)

  def plain(x, w, bias, fn_args, t):
    return plain_objective(_linear_logits(x, w, bias, w_layout), y, fn,
                           fn_args, where, t, reduction)

  argnums = (0, 1, 2, 3, 4) if traced else (0, 1, 2, 3)
  tt = jnp.float32(T_TRACED) if traced else t
  args = (x, w, bias, fn_args, tt)
  if traced:
    got = jax.jit(jax.value_and_grad(_scalar(lib, reduction), argnums))(
        *args)
  else:  # a Python float temperature: closed over, not traced
    got = jax.jit(jax.value_and_grad(
        _scalar(lambda *a: lib(*a[:4], t), reduction), argnums))(*args)
  want = _x64_value_and_grad(_scalar(plain, reduction), args, argnums)
  _assert_tree_close(got, want, jnp.float32)
  chex.assert_trees_all_equal_shapes_and_dtypes(
      got[1], tuple(args[i] for i in argnums))
  # bias's -inf slot: gradient 0.
  assert float(got[1][2][MASKED_VOCAB]) == 0.0
  # Values against the NumPy reference; the per-row values for "none".
  tv = T_TRACED if traced else t
  out = jax.jit(lib)(*args[:4], tt)
  assert_close(out, ref_objective(z, y, fn, fn_args, WHERE, tv, reduction),
               jnp.float32, finite_scale(out))
  _check_uncounted(out, (got[1][0], got[1][3]), reduction)
  if reduction == "mean":  # uncounted rows are left out of the mean
    total = js.linear_log_prob_objective(
        x, w, y, fn, fn_args, bias=bias, where=where, temperature=tt,
        reduction="sum", chunk_size=chunk, w_layout=w_layout)
    assert_close(out, as_float64(total) / (B - len(UNCOUNTED)), jnp.float32)


@pytest.mark.parametrize(("reduction", "fn", "t"), LOGIT_CASES,
                         ids=[f"{c[0]}-{c[1].__name__}-{c[2]}"
                              for c in LOGIT_CASES])
def test_logits_objective_matrix(reduction, fn, t):
  x, emb, bias, y, fn_args, z = _case_args(fn, t)
  logits = jnp.asarray(z, jnp.float32)
  traced = t == "traced"
  where = jnp.asarray(WHERE)

  def lib(z, fn_args, t):
    return js.log_prob_objective(z, y, fn, fn_args, where=where,
                                 temperature=t, reduction=reduction)

  def plain(z, fn_args, t):
    return plain_objective(z, y, fn, fn_args, where, t, reduction)

  argnums = (0, 1, 2) if traced else (0, 1)
  tt = jnp.float32(T_TRACED) if traced else t
  args = (logits, fn_args, tt)
  if traced:
    got = jax.jit(jax.value_and_grad(_scalar(lib, reduction), argnums))(
        *args)
  else:
    got = jax.jit(jax.value_and_grad(
        _scalar(lambda z, a, _: lib(z, a, t), reduction), argnums))(*args)
  want = _x64_value_and_grad(_scalar(plain, reduction), args, argnums)
  _assert_tree_close(got, want, jnp.float32)
  np.testing.assert_array_equal(np.asarray(got[1][0])[:, MASKED_VOCAB], 0.0)
  tv = T_TRACED if traced else t
  out = lib(logits, fn_args, tt)  # eager
  assert_close(out, ref_objective(z, y, fn, fn_args, WHERE, tv, reduction),
               jnp.float32, finite_scale(out))
  _check_uncounted(out, (got[1][0], got[1][1]), reduction)


def test_ignore_index_none_counts_every_row():
  x, emb, bias, y, fn_args, z = _case_args(trailing, 1.0)
  y = jnp.where(y < 0, 0, y).at[2].set(9)
  got = js.log_prob_objective(jnp.asarray(z, jnp.float32), y, trailing,
                              fn_args, ignore_index=9)
  assert_close(got, ref_objective(z, jnp.where(y == 9, -100, y), trailing,
                                  fn_args), jnp.float32)
  got = js.linear_log_prob_objective(x, emb, y, trailing, fn_args,
                                     bias=bias, ignore_index=None,
                                     w_layout="vd", reduction="none")
  assert_close(got, ref_objective(z, y, trailing, fn_args,
                                  reduction="none"), jnp.float32,
               finite_scale(got))


@pytest.mark.parametrize("api", ["linear", "logits"])
@pytest.mark.parametrize("bad", [np.inf, np.nan])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_uncounted_rows_with_bad_features_leave_every_gradient(api, bad,
                                                                reduction):
  # A masked and an ignored row hold inf/NaN features (or logits): they
  # are not counted, so no gradient may see them, the temperature's and
  # the entropy's included (the logits' path once gave NaN there).
  x, emb, bias, y, adv, noise = _data()
  if api == "logits":
    x = x @ emb.T + bias[None, :]
  x = x.at[MASKED_ROW].set(bad).at[IGNORED].set(-bad)
  old = noise
  clean = x.at[MASKED_ROW].set(0.0).at[IGNORED].set(0.0)

  def loss(x, emb, bias, old, adv, t):
    kw = dict(where=jnp.asarray(WHERE), reduction=reduction, temperature=t)
    if api == "logits":
      out = js.log_prob_objective(x, y, ppo, (old, adv), **kw)
    else:
      out = js.linear_log_prob_objective(x, emb, y, ppo, (old, adv),
                                         bias=bias, w_layout="vd",
                                         chunk_size=4, **kw)
    return jnp.sum(out * COT[:out.size].reshape(out.shape))

  grad = jax.value_and_grad(loss, (0, 1, 2, 3, 4, 5))
  val, g = grad(x, emb, bias, old, adv, 0.9)
  want_val, want = grad(clean, emb, bias, old, adv, 0.9)
  np.testing.assert_array_equal(val, want_val)
  for a, b in zip(g, want, strict=True):
    np.testing.assert_array_equal(a, b)
  assert np.all(np.isfinite(g[5])) and np.all(np.isfinite(g[0][:3]))
  if api == "linear":
    assert np.all(np.isfinite(g[1]))


@pytest.mark.parametrize("api", ["logits", "linear"])
def test_entropy_of_confident_rows_vs_reference(api):
  # Rows of spread 8..40 (entropy 1e-2 down to 1e-16): where the label is
  # the top class, entropy and log p to float32's relative precision (the
  # fused loss once took log(1 + r) plainly: 5% off at spread 20); where
  # it is not, to log's absolute ulp (log_s = log(1 + r), no second sum).
  rng = np.random.default_rng(0)
  spread = np.linspace(8.0, 40.0, 16)
  z = np.concatenate([spread[:, None], rng.uniform(-1, 1, (16, 5))], 1)
  z = z.astype(np.float32)
  y = np.where(np.arange(16) % 4 == 3, 2, 0)
  top = y == 0

  def objective(fn):
    if api == "logits":
      return js.log_prob_objective(jnp.asarray(z), jnp.asarray(y), fn,
                                   reduction="none")
    return js.linear_log_prob_objective(jnp.eye(16), jnp.asarray(z),
                                        jnp.asarray(y), fn, chunk_size=8,
                                        reduction="none")

  h = np.asarray(objective(lambda lp, h: h), np.float64)
  lp = np.asarray(objective(lambda lp, h: lp), np.float64)
  z64 = z.astype(np.float64)
  log_p = z64 - z64.max(1, keepdims=True)   # 0 at column 0 only
  log_p -= np.log1p(np.exp(log_p[:, 1:]).sum(1, keepdims=True))
  want_h = -np.sum(np.exp(log_p) * log_p, 1)
  want_lp = log_p[np.arange(16), y]
  np.testing.assert_allclose(h[top], want_h[top], rtol=1e-5)
  np.testing.assert_allclose(lp, want_lp, rtol=1e-5)
  np.testing.assert_allclose(h[~top], want_h[~top], rtol=1e-5, atol=2e-7)


@pytest.mark.parametrize("api", ["logits", "linear"])
def test_entropy_of_a_row_spread_beyond_the_float_range(api):
  # Row 0's logits 3e38 and -3e38: z - m = -6e38 overflows to -inf, whose
  # p = 0 made p log p (and the entropy's gradient p (log p + H)) NaN;
  # the entropy is 0 and every gradient of the row 0, as in float64.
  z = np.array([[3e38, -3e38, 0.0], [1.0, 2.0, -1.0]], np.float32)
  y = np.array([0, 1])

  def fn(lp, h):
    return lp + 0.5 * h

  def objective(z, fn, reduction="sum"):
    if api == "logits":
      return js.log_prob_objective(z, jnp.asarray(y), fn,
                                   reduction=reduction)
    return js.linear_log_prob_objective(z, jnp.eye(3), jnp.asarray(y), fn,
                                        reduction=reduction)

  lp, h = _ref_rows(z, y)
  assert h[0] == 0.0 and lp[0] == 0.0
  zj = jnp.asarray(z)
  np.testing.assert_allclose(objective(zj, lambda lp, h: h, "none"), h,
                             rtol=1e-6)
  np.testing.assert_allclose(objective(zj, lambda lp, h: lp, "none"), lp,
                             rtol=1e-6)
  z64 = z.astype(np.float64)
  logp = z64 - z64.max(1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(1, keepdims=True))
  p = np.exp(logp)
  want = (np.eye(3)[y] - p) - 0.5 * p * (np.where(p > 0, logp, 0.0)
                                         + h[:, None])
  got = jax.grad(lambda z: objective(z, fn))(zj)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  assert (np.asarray(got[0]) == 0.0).all()
  if api == "logits":
    aux = js.cross_entropy(zj, jnp.asarray(y), return_aux=True)[1]
    g_aux = jax.grad(lambda z: jnp.sum(js.cross_entropy(
        z, jnp.asarray(y), return_aux=True)[1].entropy))(zj)
  else:
    aux = js.linear_cross_entropy(zj, jnp.eye(3), jnp.asarray(y),
                                  return_aux=True)[1]
    g_aux = jax.grad(lambda z: jnp.sum(js.linear_cross_entropy(
        z, jnp.eye(3), jnp.asarray(y), return_aux=True)[1].entropy))(zj)
  np.testing.assert_allclose(aux.entropy, h, rtol=1e-6)
  np.testing.assert_allclose(
      g_aux, -p * (np.where(p > 0, logp, 0.0) + h[:, None]), rtol=1e-5,
      atol=1e-7)


@pytest.mark.parametrize("api", ["logits", "linear"])
def test_bfloat16_inputs(api):
  x, emb, bias, y, fn_args, _ = _case_args(trailing, 1.0)
  x, emb, bias = (a.astype(jnp.bfloat16) for a in (x, emb, bias))
  where = jnp.asarray(WHERE)
  if api == "linear":
    def lib(x, w, bias, fn_args):
      return js.linear_log_prob_objective(
          x, w, y, trailing, fn_args, bias=bias, where=where, chunk_size=5,
          w_layout="vd", temperature=0.9)
  else:
    def lib(x, w, bias, fn_args):
      return js.log_prob_objective(_linear_logits(x, w, bias, "vd"), y,
                                   trailing, fn_args, where=where,
                                   temperature=0.9)

  def plain(x, w, bias, fn_args):
    return plain_objective(_linear_logits(x, w, bias, "vd"), y, trailing,
                           fn_args, where, 0.9)

  args = (x, emb, bias, fn_args)
  got = jax.jit(jax.value_and_grad(lib, (0, 1, 2, 3)))(*args)
  chex.assert_trees_all_equal_shapes_and_dtypes(got[1], args)
  want = _x64_value_and_grad(plain, args, (0, 1, 2, 3))
  _assert_tree_close(got, want, jnp.bfloat16)


def test_vmap_over_a_leading_axis():
  x, emb, bias, y, _, _ = _data()
  x2, _, _, y2, adv2, _ = _data(seed=1)
  xs, ys = jnp.stack([x, x2]), jnp.stack([y, y2])
  ab = jnp.stack([jnp.stack([adv2, adv2 ** 2], -1),
                  jnp.stack([-adv2, 0.5 * adv2], -1)])

  def lib_linear(x, w, y, ab):
    return js.linear_log_prob_objective(x, w, y, trailing, (ab,), bias=bias,
                                        chunk_size=5, w_layout="vd",
                                        temperature=1.3)

  def lib_logits(x, w, y, ab):
    return js.log_prob_objective(_linear_logits(x, w, bias, "vd"), y,
                                 trailing, (ab,), temperature=1.3)

  def total(f):
    return lambda x, w, ab: jnp.sum(jax.vmap(f, (0, None, 0, 0))(
        x, w, ys, ab) * jnp.asarray([1.0, -0.5], x.dtype))

  with jax.enable_x64(True):
    b64 = jnp.asarray(as_float64(bias))
  want = _x64_value_and_grad(
      lambda x, w, ab: total(lambda x, w, y, ab: plain_objective(
          _linear_logits(x, w, b64, "vd"), y, trailing, (ab,), t=1.3))(
              x, w, ab), (xs, emb, ab), (0, 1, 2))
  for lib in (lib_linear, lib_logits):
    got = jax.jit(jax.value_and_grad(total(lib), (0, 1, 2)))(xs, emb, ab)
    _assert_tree_close(got, want, jnp.float32)


def test_check_grads_objective_and_weights_temperature():
  x, emb, bias, y, fn_args, z = _case_args(trailing, 1.0)
  with jax.enable_x64(True):
    x, emb, ab = (jnp.asarray(as_float64(a)) for a in (x, emb, fn_args[0]))
    bias = jnp.asarray(as_float64(bias))
    where = jnp.asarray(WHERE)

    def linear(x, w, ab, t):
      return js.linear_log_prob_objective(
          x, w, y, trailing, (ab,), bias=bias, where=where, temperature=t,
          chunk_size=5, w_layout="vd")

    def logits(z, ab, t):
      return js.log_prob_objective(z, y, trailing, (ab,), where=where,
                                   temperature=t, reduction="sum")

    v = jnp.linspace(-1.0, 2.0, B)

    def ce(z, v, t):
      return js.cross_entropy(z, y, weights=v, temperature=t, where=where,
                              label_smoothing=0.1, soft_cap=4.0,
                              z_loss=1e-2)

    t = jnp.float64(0.8)
    zz = _linear_logits(x, emb, jnp.where(jnp.isfinite(bias), bias, 0.0),
                        "vd")
    jax.test_util.check_grads(linear, (x, emb, ab, t), order=1,
                              modes=["rev"])
    jax.test_util.check_grads(logits, (zz, ab, t), order=1, modes=["rev"])
    jax.test_util.check_grads(ce, (zz, v, t), order=1, modes=["rev"])
    jax.test_util.check_grads(
        lambda x, w, v, t: js.linear_cross_entropy(
            x, w, y, weights=v, temperature=t, w_layout="vd", chunk_size=5),
        (x, emb, v, t), order=1, modes=["rev"])


# --------------------------------------------------------------------------
# 3. weights and temperature of the cross-entropies vs tests/reference.py


def _weighted_ref(z, y, v, reduction, g=COT, **opts):
  """``(value, d logits, d weights)`` of the weighted cross-entropy from
  the unweighted per-row reference: ``v * ce + z-loss`` per row, the mean
  over ``sum w_y`` (cross-entropy) and the counted rows (z-loss)."""
  zl = opts.pop("z_loss", 0.0)
  where = opts.get("where")
  ce = ref.cross_entropy(z, y, reduction="none", **opts)
  zrow = ref.cross_entropy(z, y, reduction="none", z_loss=zl, **opts) - ce
  counted = _counted(y, where)
  cw = opts.get("class_weights")
  cw = np.ones(z.shape[-1]) if cw is None else as_float64(cw)
  if reduction == "none":
    s_ce = s_z = np.asarray(g, np.float64)
    value = v * ce + zrow
  elif reduction == "sum":
    s_ce = s_z = np.ones(len(y))
    value = np.sum(v * ce + zrow)
  else:
    d = np.sum(np.where(counted, cw[np.clip(y, 0, None)], 0.0))
    s_ce, s_z = np.full(len(y), 1 / d), np.full(len(y), 1 / counted.sum())
    value = np.sum(v * ce) / d + np.sum(zrow) / counted.sum()
  dz = (ref.cross_entropy_vjp(z, y, v * s_ce, reduction="none", **opts)[0]
        + ref.cross_entropy_vjp(z, y, s_z, reduction="none", z_loss=zl,
                                **opts)[0]
        - ref.cross_entropy_vjp(z, y, s_z, reduction="none", **opts)[0])
  return value, dz, ce * s_ce


WEIGHTS = np.linspace(-1.0, 2.0, B)  # negative ones included
CE_OPTS = {"where": WHERE, "label_smoothing": 0.1,
           "class_weights": np.linspace(0.5, 2.0, V), "z_loss": 1e-2}


def _weighted_inputs():
  x, emb, bias, y, _, _ = _data()
  bias = bias.at[MASKED_VOCAB].set(0.3)
  z = as_float64(x) @ as_float64(emb).T + as_float64(bias)
  return x, emb, bias, y, z


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_weights_vs_reference(reduction):
  _, _, _, y, z = _weighted_inputs()
  opts = {k: jnp.asarray(a) for k, a in CE_OPTS.items()}

  def lib(z, v):
    return js.cross_entropy(z, y, weights=v, reduction=reduction, **opts)

  args = (jnp.asarray(z, jnp.float32), jnp.asarray(WEIGHTS, jnp.float32))
  _, (dz, dv) = jax.jit(jax.value_and_grad(_scalar(lib, reduction),
                                               (0, 1)))(*args)
  want, wdz, wdv = _weighted_ref(as_float64(args[0]), y, WEIGHTS,
                                 reduction, **CE_OPTS)
  assert_close(lib(*args), want, jnp.float32, finite_scale(want))
  assert_close(dz, wdz, jnp.float32, finite_scale(wdz))
  assert_close(dv, wdv, jnp.float32, finite_scale(wdv))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_nll_loss_weights_vs_reference(reduction):
  _, _, _, y, z = _weighted_inputs()
  lp = ref.log_softmax(z)
  cw = CE_OPTS["class_weights"]

  def lib(lp, v):
    return js.nll_loss(lp, y, weights=v, reduction=reduction,
                       where=jnp.asarray(WHERE), class_weights=cw)

  args = (jnp.asarray(lp, jnp.float32), jnp.asarray(WEIGHTS, jnp.float32))
  _, (dlp, dv) = jax.jit(jax.value_and_grad(_scalar(lib, reduction),
                                                (0, 1)))(*args)
  lp64 = as_float64(args[0])
  rows = ref.nll_loss(lp64, y, where=WHERE, class_weights=cw,
                      reduction="none")
  counted = _counted(y, WHERE)
  d = np.sum(np.where(counted, cw[np.clip(y, 0, None)], 0.0))
  scale = {"none": COT, "sum": np.ones(B), "mean": np.full(B, 1 / d)}[
      reduction]
  want = {"none": WEIGHTS * rows, "sum": np.sum(WEIGHTS * rows),
          "mean": np.sum(WEIGHTS * rows) / d}[reduction]
  assert_close(lib(*args), want, jnp.float32, finite_scale(want))
  wdlp = ref.nll_loss_vjp(lp64, y, WEIGHTS * scale, where=WHERE,
                          class_weights=cw, reduction="none")
  assert_close(dlp, wdlp, jnp.float32)
  assert_close(dv, rows * scale, jnp.float32, finite_scale(rows))


@pytest.mark.parametrize(("reduction", "chunk", "w_layout"),
                         [("mean", 5, "vd"), ("sum", 4, "dv"),
                          ("none", 5, "dv")])
def test_linear_cross_entropy_weights_vs_reference(reduction, chunk,
                                                   w_layout):
  x, emb, bias, y, z = _weighted_inputs()
  w = emb if w_layout == "vd" else emb.T
  opts = {k: jnp.asarray(a) for k, a in CE_OPTS.items()}

  def lib(x, w, bias, v):
    return js.linear_cross_entropy(x, w, y, bias=bias, weights=v,
                                   reduction=reduction, chunk_size=chunk,
                                   w_layout=w_layout, **opts)

  args = (x, w, bias, jnp.asarray(WEIGHTS, jnp.float32))
  _, grads = jax.jit(jax.value_and_grad(_scalar(lib, reduction),
                                        (0, 1, 2, 3)))(*args)
  z = as_float64(x) @ as_float64(emb).T + as_float64(bias)
  want, wdz, wdv = _weighted_ref(z, y, WEIGHTS, reduction, **CE_OPTS)
  wdx = wdz @ as_float64(emb)
  wdw = wdz.T @ as_float64(x)
  wdw = wdw if w_layout == "vd" else wdw.T
  assert_close(lib(*args), want, jnp.float32, finite_scale(want))
  for g, e in zip(grads, (wdx, wdw, wdz.sum(0), wdv), strict=True):
    assert_close(g, e, jnp.float32, finite_scale(e))


def test_weighted_mean_is_sum_over_sum_of_weights_and_z_loss_unweighted():
  x, emb, bias, y, z = _weighted_inputs()
  y = jnp.where(y < 0, 0, y)
  v = np.linspace(0.2, 3.0, B)
  logits = jnp.asarray(z, jnp.float32)
  ce = ref.cross_entropy(as_float64(logits), y, reduction="none")
  got = js.cross_entropy(logits, y, weights=v, reduction="sum") / v.sum()
  assert_close(got, np.sum(v * ce) / v.sum(), jnp.float32)
  got = js.linear_cross_entropy(x, emb, y, bias=bias, weights=v,
                                w_layout="vd", reduction="sum") / v.sum()
  assert_close(got, np.sum(v * ref.cross_entropy(z, y, reduction="none"))
               / v.sum(), jnp.float32)
  # All weights 0: only the z-loss is left, unweighted, over every row.
  zero = jnp.zeros(B)
  lse = ref.logsumexp(as_float64(logits), axis=-1)
  for reduction, want in (("sum", 1e-2 * np.sum(lse ** 2)),
                          ("mean", 1e-2 * np.mean(lse ** 2))):
    got = js.cross_entropy(logits, y, weights=zero, z_loss=1e-2,
                           reduction=reduction)
    assert_close(got, want, jnp.float32)
    got = js.linear_cross_entropy(x, emb, y, bias=bias, weights=zero,
                                  z_loss=1e-2, w_layout="vd",
                                  reduction=reduction)
    assert_close(got, want, jnp.float32)


TEMP_OPTS = {"soft_cap": 3.0, "label_smoothing": 0.15, "where": WHERE,
             "class_weights": np.linspace(0.5, 2.0, V), "z_loss": 1e-2}


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("api", ["logits", "linear"])
def test_temperature_with_soft_cap_and_smoothing_vs_reference(api,
                                                              reduction):
  x, emb, bias, y, z = _weighted_inputs()
  t = 0.7
  opts = {k: jnp.asarray(a) for k, a in TEMP_OPTS.items()}

  if api == "logits":
    def lib(x, emb, bias, t):
      return js.cross_entropy(_linear_logits(x, emb, bias, "vd"), y,
                              temperature=t, reduction=reduction, **opts)
  else:
    def lib(x, emb, bias, t):
      return js.linear_cross_entropy(x, emb, y, bias=bias, temperature=t,
                                     reduction=reduction, chunk_size=5,
                                     w_layout="vd", **opts)

  args = (x, emb, bias, jnp.float32(t))
  value, grads = jax.jit(jax.value_and_grad(_scalar(lib, reduction),
                                            (0, 1, 2, 3)))(*args)

  def reference(t):
    out = ref.cross_entropy(z / t, y, reduction=reduction, **TEMP_OPTS)
    return np.sum(out * COT) if reduction == "none" else out

  assert_close(value, reference(t), jnp.float32, finite_scale(value))
  dzt, _ = ref.cross_entropy_vjp(z / t, y, COT if reduction == "none"
                                 else 1.0, reduction=reduction, **TEMP_OPTS)
  dz = dzt / t
  h = 1e-4
  dt = (reference(t + h) - reference(t - h)) / (2 * h)
  want = (dz @ as_float64(emb), dz.T @ as_float64(x), dz.sum(0), dt)
  for g, e in zip(grads, want, strict=True):
    assert_close(g, e, jnp.float32, finite_scale(e))


# --------------------------------------------------------------------------
# 4. work and memory


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_work_three_matmuls(reduction):
  x, emb, _, y, adv, noise = _data(b=64)
  w = emb.T
  args = (x, w, noise - 3.0, adv)

  def objective(x, w, old, adv):
    return js.linear_log_prob_objective(x, w, y, ppo, (old, adv),
                                        reduction=reduction, chunk_size=16)

  for argnums in ((0, 1), (0, 1, 2, 3)):
    compiled = compile_jit(jax.value_and_grad(objective, argnums), *args)
    assert op_counts(compiled)["dot"] == 3, argnums

  def tempered(x, w, t):   # a differentiated temperature too
    return js.linear_log_prob_objective(x, w, y, ppo, (noise - 3.0, adv),
                                        temperature=t, reduction=reduction,
                                        chunk_size=16)

  compiled = compile_jit(jax.value_and_grad(tempered, (0, 1, 2)), x, w,
                         jnp.float32(0.7))
  assert op_counts(compiled)["dot"] == 3

  def weighted(x, w, v):
    return js.linear_cross_entropy(x, w, y, weights=v, reduction=reduction,
                                   chunk_size=16)

  for argnums in ((0, 1), (0, 1, 2)):
    compiled = compile_jit(jax.value_and_grad(weighted, argnums), x, w, adv)
    assert op_counts(compiled)["dot"] == 3, argnums


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_memory_no_batch_by_vocab_buffer(reduction):
  b, d, v = 8192, 256, 32000
  f32 = jnp.float32
  args = (jax.ShapeDtypeStruct((b, d), f32),
          jax.ShapeDtypeStruct((d, v), f32),
          jax.ShapeDtypeStruct((b,), jnp.int32),
          jax.ShapeDtypeStruct((b,), f32), jax.ShapeDtypeStruct((b,), f32))

  def fused(x, w, y, old, adv):
    return js.linear_log_prob_objective(x, w, y, ppo, (old, adv),
                                        reduction=reduction)

  def plain(x, w, y, old, adv):
    return plain_objective(x @ w, y, ppo, (old, adv), reduction=reduction)

  def compile_vg(f):
    return compile_jit(jax.value_and_grad(f, (0, 1)), *args)

  got = compile_vg(fused)
  assert not re.search(rf"\[{b},{v}\]", got.as_text())
  temp = got.memory_analysis().temp_size_in_bytes
  assert temp * 8 < compile_vg(plain).memory_analysis().temp_size_in_bytes


# --------------------------------------------------------------------------
# 6. errors


def test_errors():
  x, emb, bias, y, adv, _ = _data()
  z = _linear_logits(x, emb, None, "vd")

  def wrong_shape(logp, entropy):
    return jnp.stack([logp, entropy], -1)

  with pytest.raises(ValueError):
    js.log_prob_objective(z, y, wrong_shape)
  with pytest.raises(ValueError):
    js.linear_log_prob_objective(x, emb, y, wrong_shape, w_layout="vd")
  with pytest.raises(ValueError):
    js.log_prob_objective(z, y, lambda lp, h: jnp.sum(lp))
  for bad in ((jnp.arange(B),), (adv > 0,)):
    with pytest.raises(TypeError):
      js.log_prob_objective(z, y, lambda lp, h, a: lp * a, bad)
    with pytest.raises(TypeError):
      js.linear_log_prob_objective(x, emb, y, lambda lp, h, a: lp * a, bad,
                                   w_layout="vd")
  for bad in (jnp.ones(B + 1), jnp.ones((B, 1)), jnp.ones(())):
    with pytest.raises(ValueError, match="weights"):
      js.cross_entropy(z, y, weights=bad)
    with pytest.raises(ValueError, match="weights"):
      js.nll_loss(jax.nn.log_softmax(z), y, weights=bad)
    with pytest.raises(ValueError, match="weights"):
      js.linear_cross_entropy(x, emb, y, weights=bad, w_layout="vd")
  for t in (0.0, -1.0):
    with pytest.raises(ValueError, match="temperature"):
      js.cross_entropy(z, y, temperature=t)
    with pytest.raises(ValueError, match="temperature"):
      js.linear_cross_entropy(x, emb, y, temperature=t, w_layout="vd")
    with pytest.raises(ValueError, match="temperature"):
      js.log_prob_objective(z, y, entropy_only, temperature=t)
    with pytest.raises(ValueError, match="temperature"):
      js.linear_log_prob_objective(x, emb, y, entropy_only, temperature=t,
                                   w_layout="vd")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_objective_costs_one_block_more_than_the_loss(dtype):
  # The objective keeps exp(z - m) of its chunk for the entropy and its
  # gradient: at most one more (chunk, V) float32 block than the plain
  # fused loss, however its loop is laid out.
  b, d, v, chunk = 1024, 32, 8192, 128
  args = [jax.ShapeDtypeStruct(s, t) for s, t in (
      ((b, d), dtype), ((d, v), dtype), ((b,), jnp.int32),
      ((b,), jnp.float32))]

  def temp(f):
    return compile_jit(jax.value_and_grad(f, (0, 1)), *args
                       ).memory_analysis().temp_size_in_bytes

  ppo_temp = temp(lambda x, w, y, a: js.linear_log_prob_objective(
      x, w, y, ppo, (a, a), chunk_size=chunk))
  loss_temp = temp(lambda x, w, y, a: js.linear_cross_entropy(
      x, w, y, chunk_size=chunk))
  assert ppo_temp <= loss_temp + 4 * chunk * v + 64 * b, (ppo_temp, loss_temp)


def test_fused_objective_closing_over_a_traced_value():
  """An fn that closes over a traced coefficient (a train step's KL or
  entropy coefficient) raised an internal TypeError; it is now a clear
  error, and the coefficient passed through fn_args gives the value and
  gradient of log_prob_objective's closure."""
  x, emb, bias, y, adv, _ = _data()
  z = _linear_logits(x, emb, bias, "vd")

  def fused(x, emb, coef):
    return js.linear_log_prob_objective(
        x, emb, y, lambda lp, h: -lp * adv - coef * h, bias=bias,
        w_layout="vd")

  for wrap in (jax.jit, lambda f: jax.grad(f, 2)):
    with pytest.raises(ValueError, match="closes over a traced value"):
      wrap(fused)(x, emb, 0.1)
  with pytest.raises(ValueError, match="closes over a traced value"):
    jax.vmap(fused, (None, None, 0))(x, emb, jnp.array([0.1, 0.2]))

  def via_args(x, emb, coef):
    return js.linear_log_prob_objective(
        x, emb, y, lambda lp, h, c: -lp * adv - c * h,
        (jnp.full(y.shape, coef),), bias=bias, w_layout="vd")

  def closure(z, coef):
    return js.log_prob_objective(z, y, lambda lp, h: -lp * adv - coef * h)

  got = jax.jit(jax.value_and_grad(via_args, (0, 2)))(x, emb, 0.1)
  want = jax.value_and_grad(
      lambda x, c: closure(_linear_logits(x, emb, bias, "vd"), c),
      (0, 1))(x, 0.1)
  chex.assert_trees_all_close(got, want, rtol=2e-5, atol=1e-6)
  assert abs(float(got[1][1])) > 1e-3
  # A concrete closure (a Python float) is fine.
  np.testing.assert_allclose(fused(x, emb, 0.1), closure(z, 0.1), rtol=1e-6)
