"""The backend policy of the fused loss, run every way on the CPU.

The matmul layout of ``linear_cross_entropy`` depends on the backend
(``jax_softmax._numerics.matmul_policy``). Each test here forces every
policy, so the code paths a GPU or TPU takes run in this suite too, and
checks values and gradients against the float64 reference.
"""

import platform
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref

import jax_softmax as js
from jax_softmax import _linear_ce, _numerics
from jax_softmax._numerics import MatmulPolicy, matmul_policy

POLICIES = [MatmulPolicy(upcast=u, plain_dw=p, plain_w=q)
            for u in (False, True) for p in (False, True)
            for q in (False, True)]


@pytest.mark.parametrize("flags", [(), ("avx512_bf16",), ("amx_bf16",),
                                   ("avx2", "f16c", "avx512f"), None])
def test_matmul_policy_per_backend_dtype_and_layout(monkeypatch, flags):
  # bfloat16 products in bfloat16 only where the CPU has bfloat16 dot
  # instructions (where it cannot tell: converted, as float16 is).
  monkeypatch.setattr(_numerics, "cpu_flags",
                      lambda: None if flags is None else frozenset(flags))
  bf16_dots = flags is not None and any("bf16" in f for f in flags)
  for vd in (False, True):
    for dtype in (jnp.float32, jnp.float64):
      assert matmul_policy(dtype, vd, "cpu") == MatmulPolicy(False, not vd,
                                                             False)
    assert matmul_policy(jnp.float16, vd, "cpu") == MatmulPolicy(
        True, not vd, False)
    assert matmul_policy(jnp.bfloat16, vd, "cpu") == (
        MatmulPolicy(False, True, True) if bf16_dots
        else MatmulPolicy(True, not vd, False))
    for backend in ("gpu", "tpu"):
      for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        assert matmul_policy(dtype, vd, backend) == MatmulPolicy(
            False, False, False)


@pytest.mark.skipif(platform.system() != "Linux"
                    or platform.machine() not in ("x86_64", "AMD64"),
                    reason="reads x86 flags from Linux's /proc/cpuinfo")
def test_cpu_flags_are_those_of_proc_cpuinfo():
  flags = _numerics.cpu_flags()
  assert flags is not None and {"sse2", "fpu"} <= flags
  text = Path("/proc/cpuinfo").read_text()
  first = next(line for line in text.splitlines() if line.startswith("flags"))
  assert flags == frozenset(first.split(":", 1)[1].split())
  # The policy this host gets, unpatched.
  native = any(f" {f}" in first for f in ("avx512_bf16", "amx_bf16"))
  assert matmul_policy(jnp.bfloat16, False, "cpu").upcast == (not native)


def _data(dtype, b=24, d=8, v=50):
  k = jax.random.split(jax.random.key(3), 4)
  x = jax.random.normal(k[0], (b, d)).astype(dtype)
  w = jax.random.normal(k[1], (d, v)).astype(dtype)
  bias = jax.random.normal(k[2], (v,)).astype(dtype)
  y = jax.random.randint(k[3], (b,), 0, v)
  return x, w, bias, y


def _reference(x, w, bias, y, **kw):
  """Loss, dx, dw, dbias in float64 NumPy from the reference's logit
  gradient (``dx = g w^T``, ``dw = x^T g``)."""
  x64, w64, b64 = (np.asarray(a, np.float64) for a in (x, w, bias))
  z = x64 @ w64 + b64
  loss = ref.cross_entropy(z, np.asarray(y), **kw)
  g = ref.cross_entropy_vjp(z, np.asarray(y), **kw)[0]
  return loss, g @ w64.T, x64.T @ g, g.sum(0)


@pytest.mark.parametrize("policy", POLICIES, ids=str)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("w_layout", ["dv", "vd"])
def test_every_policy_matches_the_float64_reference(monkeypatch, policy,
                                                    dtype, w_layout):
  # Both gradient strategies, alternating over the policies.
  grad_in_forward = None if POLICIES.index(policy) % 2 else False
  monkeypatch.setattr(_linear_ce, "matmul_policy", lambda *_: policy)
  x, w, bias, y = _data(dtype)
  w_in = w if w_layout == "dv" else w.T
  kw = dict(label_smoothing=0.1, z_loss=1e-3)

  def f(x, w_in, bias):
    return js.linear_cross_entropy(x, w_in, y, bias=bias, chunk_size=8,
                                   w_layout=w_layout,
                                   grad_in_forward=grad_in_forward, **kw)

  loss, grads = jax.value_and_grad(f, (0, 1, 2))(x, w_in, bias)
  want = _reference(x, w, bias, y, **kw)
  dx, dw, db = grads
  if w_layout == "vd":
    dw = dw.T
  # float32: a few ulps of the sums; bfloat16: the inputs are exact, the
  # matmuls may round dz to bfloat16 (not with upcast), and each gradient
  # is rounded to bfloat16 once.
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(float(loss), want[0], rtol=tol)
  for got, exp in zip((dx, dw, db), want[1:], strict=True):
    assert got.dtype == dtype
    scale = np.max(np.abs(exp))
    assert np.max(np.abs(np.asarray(got, np.float64) - exp)) <= tol * scale


def _hlo(policy, monkeypatch, dtype, w_layout, compiled=True):
  # A fresh trace: the program of one policy, not a cached one (in a long
  # session JAX's caches of earlier tests once tripped an internal check).
  jax.clear_caches()
  monkeypatch.setattr(_linear_ce, "matmul_policy", lambda *_: policy)
  x, w, _, y = _data(dtype, b=64, v=100)
  w_in = w if w_layout == "dv" else w.T
  f = jax.value_and_grad(lambda x, w: js.linear_cross_entropy(
      x, w, y, chunk_size=16, w_layout=w_layout), (0, 1))
  lowered = jax.jit(f).lower(x, w_in)
  return lowered.compile().as_text() if compiled else lowered.as_text()


@pytest.mark.parametrize("w_layout", ["dv", "vd"])
def test_upcast_decides_the_matmul_operand_dtype(monkeypatch, w_layout):
  # Every dot of a bfloat16 call takes bfloat16 operands unless the policy
  # upcasts, when they take float32 ones (one converted copy of w).
  dots = {}
  for upcast in (False, True):
    text = _hlo(MatmulPolicy(upcast, False, False), monkeypatch, jnp.bfloat16,
                w_layout, compiled=False)
    dots[upcast] = re.findall(r"stablehlo\.dot_general[^\n]*: "
                              r"\(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\)",
                              text)
  assert dots[False] == [("bf16", "bf16")] * 3
  assert dots[True] == [("f32", "f32")] * 3


@pytest.mark.parametrize("w_layout", ["dv", "vd"])
def test_plain_w_makes_every_product_plain(monkeypatch, w_layout):
  # Without plain_w one of the two w products contracts w's last axis (a
  # transposed operand); with it every dot contracts lhs dim 1 with rhs
  # dim 0, the plain row-major product.
  for plain_w in (False, True):
    text = _hlo(MatmulPolicy(False, True, plain_w), monkeypatch,
                jnp.bfloat16, w_layout, compiled=False)
    dims = re.findall(r"stablehlo\.dot_general[^\n]*contracting_dims = "
                      r"\[(\d)\] x \[(\d)\]", text)
    assert len(dims) == 3
    assert (set(dims) == {("1", "0")}) == plain_w


def test_plain_products_decide_the_transposed_copy_of_x(monkeypatch):
  # (d, V) layout: with plain products dw's matmul reads a (chunks, d, c)
  # transposed x; without, x_c^T dz takes x as it is.
  for plain in (False, True):
    text = _hlo(MatmulPolicy(False, plain, False), monkeypatch, jnp.float32,
                "dv")
    loops = re.findall(r"%while[.\d]* = \(([^)]*)\) while\(", text)
    assert len(loops) == 1
    assert ("f32[4,8,16]" in loops[0]) == plain


def test_logsumexp_and_log_softmax_keep_tiny_non_max_terms():
  # log(1 + r) rounds to 0 in float32 for r < 6e-8; log1p does not.
  for r in (2.0**-30, np.exp(-20.0), 1e-7, 0.25):
    x = jnp.array([0.0, np.log(r)], jnp.float32)
    want = np.log1p(np.float64(np.float32(np.exp(np.float64(x[1])))))
    got = float(js.logsumexp(x))
    assert got == pytest.approx(want, rel=2**-22)
    np.testing.assert_allclose(float(js.log_softmax(x)[0]), -want,
                               rtol=2**-22)
  # Ties at the maximum: log 2 + log1p(r / 2).
  x = jnp.array([5.0, 5.0, -15.0])
  want = 5.0 + np.log(2.0) + np.log1p(np.exp(-20.0) / 2)
  assert float(js.logsumexp(x)) == pytest.approx(want, rel=2**-23)
  # Weights: b at the maximum; a sum that cancels keeps the old rules.
  got = js.logsumexp(jnp.array([0.0, -20.0]), b=jnp.array([3.0, 1.0]))
  assert float(got) == pytest.approx(np.log(3.0) + np.log1p(
      np.exp(-20.0) / 3), rel=2**-23)
  lse, sign = js.logsumexp(jnp.array([0.0, 0.0]), b=jnp.array([1.0, -1.0]),
                           return_sign=True)
  assert float(lse) == -np.inf and float(sign) == 0.0
  assert np.isnan(float(js.logsumexp(jnp.array([0.0, 1.0]),
                                     b=jnp.array([1.0, -1.0]))))


@pytest.mark.parametrize("gif", [None, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_row_with_all_logits_minus_inf_is_uncounted(gif, reduction):
  # An infinite x drives every logit of row 1 to -inf: cross_entropy of
  # those logits leaves the row out of the mean, and so must the fused
  # loss, whose gradient in the forward pass fixes the mean's denominator
  # before the loop (it is rescaled afterwards).
  x = jnp.array([[1.0, 0.0], [jnp.inf, 0.0], [0.5, 1.0]])
  w = jnp.array([[-1.0, -2.0, -3.0], [1.0, 0.0, 2.0]])
  y = jnp.array([0, 1, 2])
  kw = dict(reduction=reduction, label_smoothing=0.2, z_loss=1e-2)
  fused = jax.value_and_grad(lambda x, w: js.linear_cross_entropy(
      x, w, y, chunk_size=2, grad_in_forward=gif, **kw), (0, 1))(x, w)
  z = ref.matmul(x, w)
  want = ref.cross_entropy(z, np.asarray(y), **kw)
  g = np.nan_to_num(ref.cross_entropy_vjp(z, np.asarray(y), **kw)[0])
  np.testing.assert_allclose(float(fused[0]), want, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(fused[1][1]),
                             np.asarray(x[::2]).T @ g[::2], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(fused[1][0][::2]),
                             g[::2] @ np.asarray(w).T, rtol=1e-5)
  assert (np.asarray(fused[1][0][1]) == 0).all()


@pytest.mark.parametrize("cw", ([1.0, 2.0, 3.0], [0.0, 0.0, 0.0]))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_recount_of_a_batch_left_with_no_row_is_zero(cw, dtype):
  # Found by hypothesis: rows 0 and 2 masked, row 1's logits all -inf, so
  # no row counts and the loss is 0 with zero gradients; with class weights
  # and z-loss the recount's "no one rescaling is exact" NaN reached every
  # gradient. Its gradients are 0 whatever the factor.
  x = jnp.array([[1.0, 0.0], [jnp.inf, 0.0], [0.5, 1.0]], dtype)
  w = jnp.array([[-1.0, -2.0, -3.0], [1.0, 0.0, 2.0]], dtype)
  b = jnp.array([0.5, 0.0, -1.0], dtype)
  y = jnp.array([0, 2, 1], jnp.int8)
  where = jnp.array([False, True, False])
  kw = dict(class_weights=jnp.array(cw), z_loss=1e-2, where=where)
  z = ref.matmul(x, w) + np.asarray(
      b, np.float64)
  want = ref.cross_entropy(z, np.asarray(y),
                           **dict(kw, where=np.asarray(where)))
  assert want == 0.0
  for gif in (None, False):
    loss, grads = jax.value_and_grad(
        lambda x, w, b, gif=gif: js.linear_cross_entropy(
            x, w, y, bias=b, chunk_size=2, grad_in_forward=gif, **kw),
        (0, 1, 2))(x, w, b)
    assert float(loss) == 0.0
    for g in grads:
      np.testing.assert_array_equal(np.asarray(g, np.float32), 0.0)


def test_fused_recount_with_class_weights_and_z_loss_is_nan():
  # With class weights the cross-entropy's and the z-loss's denominators
  # change by different factors when a row drops out: no one rescaling is
  # exact, so the gradient formed in the forward pass is NaN (the value is
  # exact, and grad_in_forward=False gives the exact gradient).
  x = jnp.array([[1.0, 0.0], [jnp.inf, 0.0], [0.5, 1.0]])
  w = jnp.array([[-1.0, -2.0, -3.0], [1.0, 0.0, 2.0]])
  y = jnp.array([0, 2, 1])   # the lost row weighs 3 of 6, a third of rows
  kw = dict(class_weights=jnp.array([1.0, 2.0, 3.0]), z_loss=1e-2)
  z = ref.matmul(x, w)
  want = ref.cross_entropy(z, np.asarray(y), **kw)
  g = np.nan_to_num(ref.cross_entropy_vjp(z, np.asarray(y), **kw)[0])
  for gif in (None, False):
    loss, dw = jax.value_and_grad(lambda w, gif=gif: js.linear_cross_entropy(
        x, w, y, grad_in_forward=gif, **kw))(w)
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    if gif is None:
      assert np.isnan(np.asarray(dw)).all()
    else:
      np.testing.assert_allclose(np.asarray(dw), np.asarray(x[::2]).T @ g[::2],
                                 rtol=1e-5)
  # A "sum" has no denominators: its gradient in the forward pass is exact,
  # the hyperparameters' (formed there too) as well.
  kw = dict(kw, reduction="sum")
  g = np.nan_to_num(ref.cross_entropy_vjp(z, np.asarray(y), **kw)[0])

  def summed(w, zl, gif):
    return js.linear_cross_entropy(x, w, y, grad_in_forward=gif,
                                   **dict(kw, z_loss=zl))

  (dw, dzl), (dw_re, dzl_re) = (
      jax.grad(summed, (0, 1))(w, jnp.float32(1e-2), gif)
      for gif in (None, False))
  np.testing.assert_allclose(np.asarray(dw), np.asarray(x[::2]).T @ g[::2],
                             rtol=1e-5)
  np.testing.assert_allclose(np.asarray(dw_re), np.asarray(dw), rtol=1e-6)
  assert np.isfinite(float(dzl))
  np.testing.assert_allclose(float(dzl), float(dzl_re), rtol=1e-6)
