"""Fused linear cross-entropy: equality, memory and work, checked cold.

Values and gradients are checked twice: against the library's own
cross_entropy on the logits (which shares the row kernel) and against the
independent float64 NumPy reference (reference.linear_cross_entropy), in
float32 and, under jax.enable_x64, in float64.
"""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from helpers import (
  assert_close,
  compile_jit,
  finite_scale,
  op_counts,
  rel_err,
  set_bf16_dot_instructions,
)

import jax_softmax as js

B, D, V = 13, 8, 37  # V and B not multiples of any chunk used below


def _data(dtype=jnp.float32, b=B, v=V, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(k[0], (b, D), dtype)
  w = jax.random.normal(k[1], (D, v), dtype)
  bias = jax.random.normal(k[2], (v,), dtype)
  y = jax.random.randint(k[3], (b,), 0, v)
  return x, w, bias, y


OPTIONS = {
    "plain": {},
    "ignore": {"ignore_index": -100},
    "where": {"where": jnp.arange(B) % 4 != 1},
    "smoothing": {"label_smoothing": 0.1},
    "weights": {"class_weights": jnp.linspace(0.5, 2.0, V)},
    "z_loss": {"z_loss": 1e-2},
    "soft_cap": {"soft_cap": 3.0},
    "all": {"ignore_index": -100, "where": jnp.arange(B) != 5,
            "label_smoothing": 0.2, "class_weights": jnp.linspace(0.5, 2, V),
            "z_loss": 1e-3, "soft_cap": 4.0},
}


CASES = [(r, o, None) for r in ("mean", "sum", "none") for o in OPTIONS] + [
    (r, "all", False) for r in ("mean", "sum")]
# float64 runs compile once more: every option per row ("none", the rows
# weighted by a cotangent), every reduction with all options at once.
F64_CASES = [("none", o, None) for o in OPTIONS] + [
    (r, "all", g) for r in ("mean", "sum") for g in (None, False)]


def _labels(option, y):
  """The labels of an option's case: one ignored row where it sets
  ignore_index."""
  return y.at[3].set(-100) if "ignore" in str(OPTIONS[option]) else y


def _reference(x, w, bias, y, reduction, cot, opts, w_layout="dv"):
  """The float64 reference's ``(value, (d_x, d_w, d_bias))`` of the scalar
  the tests differentiate: the loss, or ``sum(loss * cot)`` for
  ``reduction="none"`` (``d_bias`` is None without a bias)."""
  g = np.asarray(cot, np.float64) if reduction == "none" else 1.0
  kw = dict(opts, bias=bias, w_layout=w_layout, reduction=reduction)
  value = ref.linear_cross_entropy(x, w, y, **kw)
  grads = ref.linear_cross_entropy_vjp(x, w, y, g, **kw)
  return (np.sum(value * g) if reduction == "none" else value), grads


def _assert_matches_reference(got, want, dtype):
  """``value_and_grad``'s ``(value, grads)`` against :func:`_reference`'s
  (leaf by leaf: a None gradient is no leaf), within ``TOL[dtype]`` with
  the atol scaled by each expected array's size."""
  got, want = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(got) == len(want)
  for g, e in zip(got, want, strict=True):
    assert_close(g, e, dtype, finite_scale(e))


@pytest.mark.slow
@pytest.mark.parametrize(("reduction", "option", "grad_in_forward"), CASES)
def test_equals_cross_entropy_on_logits(reduction, option, grad_in_forward):
  x, w, bias, y = _data()
  y = _labels(option, y)
  opts = OPTIONS[option]
  cot = jnp.linspace(-1.0, 2.0, B)

  def scalar(v):
    return jnp.sum(v * cot) if reduction == "none" else v

  def fused(x, w, bias):
    return scalar(js.linear_cross_entropy(
        x, w, y, bias=bias, chunk_size=4, reduction=reduction,
        grad_in_forward=grad_in_forward, **opts))

  def plain(x, w, bias):
    return scalar(js.cross_entropy(x @ w + bias[None, :], y,
                                   reduction=reduction, **opts))

  got = jax.value_and_grad(fused, (0, 1, 2))(x, w, bias)
  want = jax.value_and_grad(plain, (0, 1, 2))(x, w, bias)
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert rel_err(g, e) < 2e-5
  # The independent float64 reference of the same (float32) inputs.
  _assert_matches_reference(
      got, _reference(x, w, bias, y, reduction, cot, opts), jnp.float32)


def _float64(opts):
  """The options with their float arrays in float64 (inside enable_x64)."""
  return {k: jnp.asarray(v, jnp.float64)
          if jnp.issubdtype(jnp.result_type(v), jnp.floating) else v
          for k, v in opts.items()}


@pytest.mark.slow
@pytest.mark.parametrize(("reduction", "option", "grad_in_forward"),
                         F64_CASES)
def test_float64_equals_reference(reduction, option, grad_in_forward):
  with jax.enable_x64(True):
    x, w, bias, y = _data(jnp.float64)
    y = _labels(option, y)
    opts = _float64(OPTIONS[option])
    cot = jnp.linspace(-1.0, 2.0, B, dtype=jnp.float64)

    def fused(x, w, bias):
      out = js.linear_cross_entropy(
          x, w, y, bias=bias, chunk_size=4, reduction=reduction,
          grad_in_forward=grad_in_forward, **opts)
      return jnp.sum(out * cot) if reduction == "none" else out

    got = jax.value_and_grad(fused, (0, 1, 2))(x, w, bias)
    chex.assert_type(jax.tree.leaves(got), jnp.float64)
    _assert_matches_reference(
        got, _reference(x, w, bias, y, reduction, cot, opts), jnp.float64)


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [None, 1, 5, B, 64])
@pytest.mark.parametrize("w_layout", ["dv", "vd"])
def test_float64_layouts_and_chunks_equal_reference(chunk, w_layout):
  # Chunks that divide the batch (1, B) and that do not (5, 64 > B), in
  # both layouts, with every option: the mean's divisor (counted rows,
  # summed class weights) gathered over the chunks.
  with jax.enable_x64(True):
    x, w, bias, y = _data(jnp.float64)
    y = _labels("all", y)
    opts = _float64(OPTIONS["all"])
    w = w if w_layout == "dv" else jnp.asarray(w.T)

    def fused(x, w, bias):
      return js.linear_cross_entropy(x, w, y, bias=bias, chunk_size=chunk,
                                     w_layout=w_layout, **opts)

    got = jax.value_and_grad(fused, (0, 1, 2))(x, w, bias)
    _assert_matches_reference(
        got, _reference(x, w, bias, y, "mean", None, opts, w_layout),
        jnp.float64)


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [None, 1, 5, B, 64])
@pytest.mark.parametrize("b", [1, B])
def test_equals_optax_any_chunk(chunk, b):
  x, w, _, y = _data(b=b)

  def fused(x, w):
    return js.linear_cross_entropy(x, w, y, chunk_size=chunk)

  def plain(x, w):
    return optax.softmax_cross_entropy_with_integer_labels(x @ w, y).mean()

  got = jax.value_and_grad(fused, (0, 1))(x, w)
  want = jax.value_and_grad(plain, (0, 1))(x, w)
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert rel_err(g, e) < 2e-5
  _assert_matches_reference(got, _reference(x, w, None, y, "mean", None, {}),
                            jnp.float32)


def test_all_ignored_batch_gives_zero_loss_and_gradient():
  x, w, _, y = _data()
  f = jax.value_and_grad(
      lambda x, w: js.linear_cross_entropy(
          x, w, jnp.full_like(y, -1), ignore_index=-1, chunk_size=4), (0, 1))
  loss, (dx, dw) = f(x, w)
  assert float(loss) == 0.0
  assert not np.any(np.asarray(dx)) and not np.any(np.asarray(dw))


@pytest.mark.slow
def test_hyperparameter_gradients_match_plain():
  x, w, _, y = _data()
  cw = jnp.linspace(0.5, 2.0, V)

  def fused(eps, zl, cap, cw):
    return js.linear_cross_entropy(x, w, y, chunk_size=4,
                                   label_smoothing=eps, z_loss=zl,
                                   soft_cap=cap, class_weights=cw)

  def plain(eps, zl, cap, cw):
    return js.cross_entropy(x @ w, y, label_smoothing=eps, z_loss=zl,
                            soft_cap=cap, class_weights=cw)

  args = (0.1, 1e-2, 5.0, cw)
  got = jax.grad(fused, (0, 1, 2, 3))(*args)
  want = jax.grad(plain, (0, 1, 2, 3))(*args)
  for g, e in zip(got, want, strict=True):
    assert rel_err(g, e) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("reduction,cw", [("mean", "none"), ("mean", "fixed"),
                                          ("sum", "none"), ("sum", "learned")])
def test_hyperparameter_gradients_formed_in_the_forward_pass(reduction, cw):
  """Smoothing, z-loss, cap and temperature (and class weights, fixed or,
  but for a "mean", whose denominator needs the loss, learned)
  differentiated together with ``x`` and ``w``: three matmuls, and the
  float64 reference's gradients (central differences for the
  hyperparameters)."""
  x, w, _, y = _data(b=64, v=100)
  y = y.at[5].set(-100)
  weights = jnp.linspace(0.5, 2.0, 100)
  hyper = (0.1, 1e-2, 5.0, 0.7) + ((weights,) if cw == "learned" else ())
  fixed = weights if cw == "fixed" else None

  def fused(x, w, eps, zl, cap, t, cw=fixed):
    return js.linear_cross_entropy(
        x, w, y, chunk_size=16, label_smoothing=eps, z_loss=zl, soft_cap=cap,
        temperature=t, class_weights=cw, reduction=reduction)

  args = (x, w) + tuple(jnp.asarray(a, jnp.float32) for a in hyper)
  f = jax.value_and_grad(fused, tuple(range(len(args))))
  assert op_counts(compile_jit(f, *args))["dot"] == 3
  value, grads = f(*args)

  z = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  fixed64 = None if fixed is None else np.asarray(fixed, np.float64)

  def reference(eps, zl, cap, t, cw=fixed64):
    return ref.cross_entropy(z / t, y, label_smoothing=eps, z_loss=zl,
                             soft_cap=cap, class_weights=cw,
                             reduction=reduction)

  h64 = [np.asarray(a, np.float64) for a in hyper]
  assert_close(value, reference(*h64), jnp.float32, finite_scale(value))
  dzt, _ = ref.cross_entropy_vjp(
      z / h64[3], y, label_smoothing=h64[0], z_loss=h64[1], soft_cap=h64[2],
      class_weights=h64[4] if cw == "learned" else fixed64,
      reduction=reduction)
  dz = dzt / h64[3]
  want = [dz @ np.asarray(w, np.float64).T, np.asarray(x, np.float64).T @ dz]
  for i, a in enumerate(h64):
    step = 1e-5 * np.eye(a.size)
    want.append(np.array([
        (reference(*h64[:i], a + s.reshape(a.shape), *h64[i + 1:])
         - reference(*h64[:i], a - s.reshape(a.shape), *h64[i + 1:]))
        / 2e-5 for s in step]).reshape(a.shape))
  for g, e in zip(grads, want, strict=True):
    assert_close(g, e, jnp.float32, finite_scale(e))


@pytest.mark.slow
@pytest.mark.parametrize("api", ["logits", "fused"])
def test_soft_cap_gradient_includes_the_aux_outputs(api):
  """``lse`` and ``entropy`` of ``return_aux`` are those of the capped
  logits: their cotangents reach ``d / d soft_cap`` (and temperature), as
  in plain autodiff of the same expression."""
  x, w, _, y = _data()

  def ours(x, w, cap, t):
    if api == "logits":
      loss, aux = js.cross_entropy(x @ w, y, soft_cap=cap, temperature=t,
                                   return_aux=True)
    else:
      loss, aux = js.linear_cross_entropy(x, w, y, chunk_size=4,
                                          soft_cap=cap, temperature=t,
                                          return_aux=True)
    return loss + 0.3 * aux.entropy.mean() + 0.1 * aux.lse.mean()

  def plain(x, w, cap, t):
    zc = cap * jnp.tanh(x @ w / t / cap)
    log_p = jax.nn.log_softmax(zc)
    nll = -jnp.take_along_axis(log_p, y[:, None], 1).mean()
    entropy = -jnp.sum(jnp.exp(log_p) * log_p, 1)
    return (nll + 0.3 * entropy.mean()
            + 0.1 * jax.nn.logsumexp(zc, axis=1).mean())

  args = (x, w, jnp.float32(5.0), jnp.float32(0.7))
  got = jax.grad(ours, (0, 1, 2, 3))(*args)
  want = jax.grad(plain, (0, 1, 2, 3))(*args)
  for g, e in zip(got, want, strict=True):
    assert rel_err(g, e) < 1e-5


@pytest.mark.slow
def test_leading_batch_dims_and_vmap():
  x, w, _, y = _data(b=12)
  x3, y3 = x.reshape(3, 4, D), y.reshape(3, 4)
  per_row = js.linear_cross_entropy(x3, w, y3, reduction="none")
  chex.assert_shape(per_row, (3, 4))
  want = js.cross_entropy(x @ w, y, reduction="none").reshape(3, 4)
  assert rel_err(per_row, want) < 1e-6
  want64 = ref.linear_cross_entropy(x3, w, y3, reduction="none")
  assert_close(per_row, want64, jnp.float32, finite_scale(want64))
  means = jax.vmap(lambda a, b: js.linear_cross_entropy(a, w, b,
                                                        chunk_size=3))(x3, y3)
  assert rel_err(means, want.mean(axis=1)) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_dtypes(dtype):
  x, w, _, y = _data(dtype)
  loss, (dx, dw) = jax.value_and_grad(
      lambda x, w: js.linear_cross_entropy(x, w, y, chunk_size=4),
      (0, 1))(x, w)
  assert loss.dtype == jnp.float32
  assert dx.dtype == dtype and dw.dtype == dtype
  x64, w64 = (np.asarray(a, np.float64) for a in (x, w))
  z = x64 @ w64
  lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
  want = np.mean(lse - z[np.arange(B), np.asarray(y)])
  assert abs(float(loss) - want) / want < 2e-2
  # The float64 reference of the rounded inputs: the float32-accumulated
  # loss within float32's bound, the gradients within their dtype's.
  want, (edx, edw, _) = _reference(x, w, None, y, "mean", None, {})
  assert_close(loss, want, jnp.float32, finite_scale(want))
  assert_close(dx, edx, dtype, finite_scale(edx))
  assert_close(dw, edw, dtype, finite_scale(edw))


@pytest.mark.slow
def test_work_three_matmuls_and_frozen_inputs_skip_theirs():
  x, w, _, y = _data(b=64, v=100)

  def loss(x, w, **kw):
    return js.linear_cross_entropy(x, w, y, chunk_size=16, **kw)

  assert op_counts(compile_jit(loss, x, w))["dot"] == 1  # primal: loss only
  both = compile_jit(jax.value_and_grad(loss, (0, 1)), x, w)
  assert op_counts(both)["dot"] == 3
  assert op_counts(compile_jit(jax.grad(loss, 0), x, w))["dot"] == 2
  assert op_counts(compile_jit(jax.grad(loss, 1), x, w))["dot"] == 2
  recompute = compile_jit(jax.value_and_grad(
      lambda x, w: loss(x, w, grad_in_forward=False), (0, 1)), x, w)
  assert op_counts(recompute)["dot"] == 4

  def with_entropy_bonus(x, w):   # aux cotangents: one more sweep
    value, aux = loss(x, w, return_aux=True)
    return value - 0.01 * aux.entropy.mean()

  bonus = compile_jit(jax.value_and_grad(with_entropy_bonus, (0, 1)), x, w)
  assert op_counts(bonus)["dot"] == 6
  # No copy or transpose of w anywhere in the gradient program.
  text = both.as_text()
  assert not re.search(r"f32\[(8,100|100,8)\][^ ]* (copy|transpose)\(", text)


@pytest.mark.slow
@pytest.mark.parametrize("use", ["mean", "none", "aux_entropy"])
def test_tied_embedding_layout_vd_is_used_as_is(use):
  x, w, bias, y = _data(b=64, v=100)
  emb = jnp.asarray(w.T)  # (V, d), as a tied embedding is stored
  cot = jnp.linspace(-1.0, 2.0, 64)

  def loss(x, w, bias, **kw):
    if use == "aux_entropy":  # aux cotangents: a recomputing sweep
      out, aux = js.linear_cross_entropy(x, w, y, bias=bias, chunk_size=16,
                                         return_aux=True, **kw)
      return out - 0.1 * jnp.mean(aux.entropy)
    out = js.linear_cross_entropy(x, w, y, bias=bias, chunk_size=16,
                                  reduction=use, **kw)
    return jnp.sum(out * cot) if use == "none" else out

  def tied(x, e, bias):
    return loss(x, e, bias, w_layout="vd")

  got = jax.value_and_grad(tied, (0, 1, 2))(x, emb, bias)
  value, (dx, dw, db) = jax.value_and_grad(loss, (0, 1, 2))(x, w, bias)
  chex.assert_trees_all_close(got, (value, (dx, dw.T, db)), rtol=2e-5,
                              atol=1e-6)
  if use != "aux_entropy":  # (the reference has no entropy term)
    _assert_matches_reference(
        got, _reference(x, emb, bias, y, use, cot, {}, w_layout="vd"),
        jnp.float32)
  # The (V, d) embedding and its gradient are neither copied nor
  # transposed (a copy of a zeros broadcast, a loop's initial accumulator,
  # is not one), and the matmul counts are those of the (d, V) layout.
  for argnums in [(0, 1), (0,), (1,)]:
    f = jax.value_and_grad(tied, argnums)
    compiled = compile_jit(f, x, emb, bias)
    assert not re.search(r"f32\[(8,100|100,8)\][^ ]* (copy|transpose)\("
                         r"(?!%(wrapped_)?broadcast)", compiled.as_text())
    plain = compile_jit(jax.value_and_grad(loss, argnums), x, w, bias)
    assert op_counts(compiled)["dot"] == op_counts(plain)["dot"]
  with pytest.raises(ValueError, match=r"\(V, d\) \(w_layout='vd'\)"):
    js.linear_cross_entropy(x, w, y, w_layout="vd")
  with pytest.raises(ValueError, match="w_layout must be"):
    js.linear_cross_entropy(x, w, y, w_layout="VD")


def _in_layout(w, w_layout):
  """``w`` (d, V) as passed with ``w_layout``, and its HLO shape text."""
  if w_layout == "dv":
    return w, "{},{}".format(*w.shape)
  return jnp.asarray(w.T), "{1},{0}".format(*w.shape)


@pytest.mark.slow
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU only")
@pytest.mark.parametrize("w_layout", ["dv", "vd"])
@pytest.mark.parametrize(("dtype", "bf16_dots"), [
    (jnp.bfloat16, True), (jnp.bfloat16, False), (jnp.float16, False)])
def test_half_precision_w_on_cpu(monkeypatch, w_layout, dtype, bf16_dots):
  set_bf16_dot_instructions(monkeypatch, bf16_dots)
  native = dtype == jnp.bfloat16 and bf16_dots
  x, w, _, y = _data(dtype, b=64, v=100)
  w, shape = _in_layout(w, w_layout)
  f = jax.value_and_grad(lambda x, w: js.linear_cross_entropy(
      x, w, y, chunk_size=16, w_layout=w_layout), (0, 1))
  text = compile_jit(f, x, w).as_text()
  # float16 (no CPU kernels) and bfloat16 without bfloat16 dot
  # instructions: one float32 copy of w for the one sweep (without it XLA
  # converts w inside the dots of every chunk). bfloat16 with them: the
  # matmuls take bfloat16 operands, so w is never converted.
  converts = re.findall(rf"f32\[{shape}\][^ ]* convert\(", text)
  assert len(converts) == (0 if native else 1)
  lowered = jax.jit(f).lower(x, w).as_text()
  operands = re.findall(r"stablehlo\.dot_general[^\n]*: "
                        r"\(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\)",
                        lowered)
  want = ("bf16", "bf16") if native else ("f32", "f32")
  assert operands == [want] * 3


@pytest.mark.parametrize("bf16_dots", [True, False])
@pytest.mark.parametrize("objective", [False, True])
@pytest.mark.parametrize(("b", "chunk"), [(4, 4), (10, 3), (2, None), (13, 4)])
def test_half_precision_vd_gradient_runs_eagerly(monkeypatch, b, chunk,
                                                 objective, bf16_dots):
  # A one-trip chunk loop let XLA fold the final transpose of the (d, V)
  # dw accumulator into its product, a dot the CPU backend cannot run in
  # bfloat16 ("Unsupported element type for DotThunk"): executed here,
  # eagerly (the forward pass compiled alone) and under jit, against the
  # float64 reference of the rounded inputs, with the policy of a CPU
  # with bfloat16 dot instructions (the path of that crash) and without.
  set_bf16_dot_instructions(monkeypatch, bf16_dots)
  x, w, bias, y = _data(jnp.bfloat16, b=b)
  wt = jnp.asarray(w.T)

  def loss(x, wt, bias):
    kw = dict(bias=bias, chunk_size=chunk, w_layout="vd")
    if objective:
      return js.linear_log_prob_objective(x, wt, y, lambda lp, h: -lp, **kw)
    return js.linear_cross_entropy(x, wt, y, **kw)

  want = _reference(x, wt, bias, y, "mean", None, {}, w_layout="vd")
  for f in (jax.value_and_grad(loss, (0, 1, 2)),
            jax.jit(jax.value_and_grad(loss, (0, 1, 2)))):
    value, grads = f(x, wt, bias)
    assert [g.dtype for g in grads] == [jnp.bfloat16] * 3
    assert_close(value, want[0], jnp.float32, finite_scale(want[0]))
    for g, e in zip(grads, want[1], strict=True):
      assert_close(g, e, jnp.bfloat16, finite_scale(e))


@pytest.mark.slow
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU only")
@pytest.mark.parametrize("grad_in_forward", [None, False])
@pytest.mark.parametrize(("dtype", "bf16_dots"), [
    (jnp.float32, False), (jnp.bfloat16, True), (jnp.bfloat16, False)])
@pytest.mark.parametrize("w_layout", ["dv", "vd"])
def test_dw_matmul_is_a_plain_product_on_cpu(monkeypatch, grad_in_forward,
                                             dtype, bf16_dots, w_layout):
  # XLA's CPU backend runs (d, c) @ (c, V) through YNNPACK but x_c^T @ g
  # (lhs contracting dim 0) through a slower kernel: the (d, V) layout's
  # dw matmul takes the chunk of x transposed. In float32 the (V, d)
  # layout keeps dz^T x_c and makes no copy of x; in bfloat16 it also
  # takes x transposed and accumulates dw as (d, V), transposed once
  # (where the CPU has bfloat16 dot instructions; without them bfloat16
  # is converted and laid out as float32).
  set_bf16_dot_instructions(monkeypatch, bf16_dots)
  x, w, _, y = _data(dtype, b=64, v=100)
  w, shape = _in_layout(w, w_layout)
  f = jax.value_and_grad(lambda x, w: js.linear_cross_entropy(
      x, w, y, chunk_size=16, grad_in_forward=grad_in_forward,
      w_layout=w_layout), (0, 1))
  text = compile_jit(f, x, w).as_text()
  plain = w_layout == "dv" or bf16_dots
  dw_shape = "8,100" if plain else shape
  dims = re.findall(rf"f32\[{dw_shape}\][^ ]* dot\([^)]*\), "
                    r"lhs_contracting_dims=\{(\d)\}, "
                    r"rhs_contracting_dims=\{(\d)\}", text)
  assert dims == [("1", "0") if plain else ("0", "0")]
  # The gradient loop's inputs include the (chunks, d, c) transposed x
  # where dw is plain (with grad_in_forward=False the forward loop has
  # none).
  loops = re.findall(r"%while[.\d]* = \(([^)]*)\) while\(", text)
  assert len(loops) == (1 if grad_in_forward is None else 2)
  # (XLA's CPU backend keeps a bfloat16 x^T as float32 between chunks and
  # converts each chunk back: its dots still take bfloat16.)
  has_xt = ["f32[4,8,16]" in types for types in loops]
  assert has_xt[-1] == plain
  assert not any(has_xt[:-1])


@pytest.mark.slow
@pytest.mark.parametrize("grad_in_forward", [None, False])
def test_no_batch_by_vocab_buffer(grad_in_forward):
  b, d, v = 256, 16, 1000
  args = (jax.ShapeDtypeStruct((b, d), jnp.float32),
          jax.ShapeDtypeStruct((d, v), jnp.float32),
          jax.ShapeDtypeStruct((b,), jnp.int32))
  f = jax.value_and_grad(lambda x, w, y: js.linear_cross_entropy(
      x, w, y, chunk_size=32, grad_in_forward=grad_in_forward), (0, 1))
  compiled = compile_jit(f, *args)
  assert not re.search(rf"\[{b},{v}\]", compiled.as_text())
  # Bound the temporaries too: well under one (b, V) float32 buffer.
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < b * v * 4 / 2


@pytest.mark.slow
def test_memory_at_most_one_eighth_of_optax():
  b, d, v = 8192, 256, 32000
  args = (jax.ShapeDtypeStruct((b, d), jnp.float32),
          jax.ShapeDtypeStruct((d, v), jnp.float32),
          jax.ShapeDtypeStruct((b,), jnp.int32))

  def fused(x, w, y):
    return js.linear_cross_entropy(x, w, y)

  def plain(x, w, y):
    return optax.softmax_cross_entropy_with_integer_labels(x @ w, y).mean()

  def temp(f):
    compiled = compile_jit(jax.value_and_grad(f, (0, 1)), *args)
    return compiled.memory_analysis().temp_size_in_bytes

  assert temp(fused) * 8 <= temp(plain)


@pytest.mark.slow
def test_vocab_split_over_a_vmap_axis_name():
  # axis_name also names a vmap axis (pmax/psum over it); no shard_map
  # typing there, so the mesh checks stay out of the way.
  x, w, bias, y = _data(v=40)
  shards = w.reshape(D, 4, 10).transpose(1, 0, 2)
  got = jax.vmap(lambda w_: js.linear_cross_entropy(
      x, w_, y, axis_name="i", label_smoothing=0.1), axis_name="i")(shards)
  want = js.linear_cross_entropy(x, w, y, label_smoothing=0.1)
  np.testing.assert_allclose(got, jnp.full(4, want), rtol=2e-6)


def test_default_chunk_size_budget():
  from jax_softmax._chunks import CHUNK_BUDGET_BYTES, default_chunk_size
  c = default_chunk_size(8192, 32000)
  assert 8 <= c and 12 * c * 32000 <= CHUNK_BUDGET_BYTES
  assert default_chunk_size(4096, 262144) >= 256  # the floor on rows
  assert default_chunk_size(10, 32000) == 10
  assert default_chunk_size(8192, 32000) % 8 == 0 or 8192 % c == 0


def test_errors():
  x, w, bias, y = _data()
  with pytest.raises(ValueError, match=r"\(d, V\)"):
    js.linear_cross_entropy(x, w.T, y)
  with pytest.raises(ValueError, match="bias must have shape"):
    js.linear_cross_entropy(x, w, y, bias=bias[:-1])
  with pytest.raises(TypeError, match="integer"):
    js.linear_cross_entropy(x, w, y.astype(jnp.float32))
  with pytest.raises(ValueError, match=r"label 99 at position \(2,\)"):
    js.linear_cross_entropy(x, w, y.at[2].set(99))
  with pytest.raises(ValueError, match="grad_in_forward=True"):
    js.linear_cross_entropy(x, w, y, reduction="none", grad_in_forward=True)
  with pytest.raises(ValueError, match="'model' is not bound"):
    js.linear_cross_entropy(x, w, y, axis_name="model")


@pytest.mark.parametrize("w_layout", ["dv", "vd"])
@pytest.mark.parametrize(("reduction", "grad_in_forward"),
                         [("mean", None), ("sum", False), ("none", None)])
def test_whole_batch_dw_product_matches_reference(w_layout, reduction,
                                                  grad_in_forward):
  # b * 4 bytes <= 4 * d: the whole batch's dz fits in the accumulator's
  # room, so dw is one product over the batch (chunks of 2 rows), with
  # a masked, an ignored and a NaN-featured masked row.
  from jax_softmax._chunks import group_size

  b = 8
  assert group_size(b // 2, 2, D, 4) == b // 2
  assert group_size(b // 2 + 1, 2, D, 4) == 1
  x, w, bias, y = _data(b=b)
  x = x.at[5].set(jnp.nan)
  y = y.at[3].set(-100)
  where = jnp.arange(b) != 5
  opts = {"where": where, "label_smoothing": 0.1, "z_loss": 1e-3}
  cot = jnp.linspace(-1.0, 2.0, b)
  wl = w if w_layout == "dv" else jnp.asarray(w.T)

  def fused(x, w, bias):
    v = js.linear_cross_entropy(x, w, y, bias=bias, chunk_size=2,
                                reduction=reduction, w_layout=w_layout,
                                grad_in_forward=grad_in_forward, **opts)
    return jnp.sum(v * cot) if reduction == "none" else v

  got = jax.value_and_grad(fused, (0, 1, 2))(x, wl, bias)
  want = _reference(x.at[5].set(0.0), wl, bias, y, reduction, cot, opts,
                    w_layout=w_layout)
  # The masked row's NaN features reach nothing: its dx is 0.
  chex.assert_tree_all_finite(got)
  _assert_matches_reference(got, want, jnp.float32)
