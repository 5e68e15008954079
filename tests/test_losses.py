"""cross_entropy, nll_loss and the optax-compatible names."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from helpers import LOW, assert_close, assert_scaled_close, ulp_close
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax.experimental import checkify
from jax.test_util import check_grads

import jax_softmax as js

N, C = 6, 5
IGNORE = -100
REDUCTIONS = ("mean", "sum", "none")
# Gradients come back in the input dtype and are checked with helpers.TOL;
# losses are float32 and checked tighter.

W = np.array([0.5, 1.0, 2.0, 1.5, 0.25], np.float32)
OPTS = {
    "plain": {},
    "smooth": {"label_smoothing": 0.1},
    "weights": {"class_weights": W},
    "zloss": {"z_loss": 0.02},
    "cap": {"soft_cap": 2.0},
    "all": {"label_smoothing": 0.2, "class_weights": W, "z_loss": 0.02,
            "soft_cap": 3.0},
}


def _rng(seed):
  return np.random.default_rng(seed)


Z = (2.0 * _rng(0).standard_normal((N, C))).astype(np.float32)
Y = np.array([1, 4, 0, 2, 3, 1], np.int32)
Y_IGN = np.array([1, 4, IGNORE, 2, IGNORE, 1], np.int32)
ROW_MASK = np.array([True, True, False, True, True, True])
CLASS_MASK = _rng(1).random((N, C)) < 0.6
CLASS_MASK[np.arange(N), Y] = True          # targets stay on the support
CLASS_MASK[:, 0] = True


def _probs(seed, mask=None):
  t = _rng(seed).dirichlet(np.ones(C), size=N)
  if mask is not None:
    t = np.where(mask, t, 0.0)
    t /= t.sum(-1, keepdims=True)
  return t.astype(np.float32)


T = _probs(2)
T_MASKED = _probs(2, CLASS_MASK)


def setup(kind, where_kind):
  """``(logits, labels, kwargs)`` for a kind ('int'/'prob') and a mask."""
  kw = {}
  labels = Y if kind == "int" else T
  if where_kind == "class":
    kw["where"] = CLASS_MASK
    labels = Y if kind == "int" else T_MASKED
  elif where_kind == "row":
    kw["where"] = ROW_MASK
  elif where_kind == "ignore":
    kw["ignore_index"] = IGNORE
    if kind == "int":
      labels = Y_IGN
  return Z, labels, kw


def cotangent(reduction, shape=(N,), seed=3):
  if reduction == "none":
    return _rng(seed).standard_normal(shape).astype(np.float32)
  return np.float32(1.7)


_STATIC = ("axis", "ignore_index", "reduction", "check_labels")
# Jitted entry points for the tests on shapes of their own: one compilation
# per configuration is far cheaper than eager dispatch of every operation.
CE = jax.jit(js.cross_entropy, static_argnames=_STATIC)
CE_VG = jax.jit(jax.value_and_grad(js.cross_entropy), static_argnames=_STATIC)
CE_GRAD = jax.jit(jax.grad(js.cross_entropy), static_argnames=_STATIC)


# --------------------------------------------------------------------------
# plain jax.numpy versions (autodiff references; finite logits, non-empty
# rows; integer labels in range or ignored)


def plain_cross_entropy(z, labels, *, where=None, ignore_index=None,
                        label_smoothing=0.0, class_weights=None, z_loss=0.0,
                        soft_cap=None, reduction="mean"):
  n, c = z.shape
  if soft_cap is not None:
    z = soft_cap * jnp.tanh(z / soft_cap)
  sup = jnp.ones(z.shape, bool)
  row = jnp.ones((n,), bool)
  if where is not None and where.ndim == 2:
    sup = jnp.asarray(where)
  elif where is not None:
    row = jnp.asarray(where)
  w = jnp.ones((c,)) if class_weights is None else class_weights
  lse = jax.nn.logsumexp(z, axis=-1, where=sup)
  nll = jnp.where(sup, lse[:, None] - jnp.where(sup, z, 0.0), 0.0)
  k = jnp.sum(sup, axis=-1)
  eps = label_smoothing
  if jnp.issubdtype(labels.dtype, jnp.integer):
    if ignore_index is not None:
      row = row & (labels != ignore_index)
    onehot = jax.nn.one_hot(labels, c)
    w_y = jnp.sum(onehot * w[None, :], axis=-1)
    ce = (1 - eps) * w_y * jnp.sum(onehot * nll, axis=-1)
    ce = ce + eps * jnp.sum(w[None, :] * nll, axis=-1) / k
    weight = w_y
  else:
    q = (1 - eps) * labels + eps * sup / k[:, None]
    ce = jnp.sum(w[None, :] * q * nll, axis=-1)
    weight = jnp.ones((n,))
  ce = jnp.where(row, ce, 0.0)
  zr = jnp.where(row, jnp.square(lse), 0.0)
  if reduction == "none":
    return ce + z_loss * zr
  if reduction == "sum":
    return jnp.sum(ce) + z_loss * jnp.sum(zr)
  return (jnp.sum(ce) / jnp.sum(jnp.where(row, weight, 0.0))
          + z_loss * jnp.sum(zr) / jnp.sum(row))


def plain_nll(lp, labels, *, where=None, ignore_index=None,
              class_weights=None, reduction="mean"):
  n, c = lp.shape
  row = jnp.ones((n,), bool)
  if where is not None and where.ndim == 1:
    row = jnp.asarray(where)
  if ignore_index is not None:
    row = row & (labels != ignore_index)
  w = jnp.ones((c,)) if class_weights is None else class_weights
  onehot = jax.nn.one_hot(labels, c)
  w_y = jnp.sum(onehot * w[None, :], axis=-1)
  ce = jnp.where(row, -w_y * jnp.sum(onehot * lp, axis=-1), 0.0)
  if reduction == "none":
    return ce
  if reduction == "sum":
    return jnp.sum(ce)
  return jnp.sum(ce) / jnp.sum(jnp.where(row, w_y, 0.0))


# --------------------------------------------------------------------------
# cross_entropy against the float64 reference


def lib_vjp(fn, z, labels, g, kind, jit=False, **kw):
  """``(loss, d_logits, d_labels)`` of the library through ``jax.vjp``.

  ``jit=True`` compiles the whole computation once: much cheaper than eager
  dispatch for shapes the suite has not seen yet.
  """
  def run(z, labels, g):
    if kind == "int":
      out, vjp = jax.vjp(lambda z: fn(z, labels, **kw), z)
      return out, vjp(g)[0], None
    out, vjp = jax.vjp(lambda z, t: fn(z, t, **kw), z, labels)
    return (out,) + vjp(g)

  return (jax.jit(run) if jit else run)(z, labels, g)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ("int", "prob"))
@pytest.mark.parametrize("opts", OPTS)
@pytest.mark.parametrize("where_kind", ("none", "class", "row", "ignore"))
def test_float64_matches_reference(kind, opts, where_kind):
  z, labels, kw = setup(kind, where_kind)
  kw.update(OPTS[opts])
  for reduction in REDUCTIONS:
    g = cotangent(reduction)
    with jax.enable_x64(True):
      lab = jnp.asarray(labels, None if kind == "int" else jnp.float64)
      out, dz, dt = lib_vjp(js.cross_entropy, jnp.asarray(z, jnp.float64),
                            lab, jnp.asarray(g, jnp.float64), kind,
                            reduction=reduction, **kw)
      chex.assert_type(out, jnp.float64)
    expected = ref.cross_entropy(z, labels, reduction=reduction, **kw)
    edz, edt = ref.cross_entropy_vjp(z, labels, g, reduction=reduction,
                                     **kw)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(dz, edz, rtol=1e-11, atol=1e-13)
    if kind == "prob":
      np.testing.assert_allclose(dt, edt, rtol=1e-11, atol=1e-13)


PLAIN_CASES = [(o, "row") for o in OPTS] + [("plain", "class"),
                                            ("all", "class")]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ("int", "prob"))
@pytest.mark.parametrize("opts,where_kind", PLAIN_CASES)
def test_matches_plain_autodiff(kind, opts, where_kind):
  """value_and_grad w.r.t. logits, targets and every hyperparameter."""
  z, labels, kw = setup(kind, where_kind)
  hp = {k: jnp.asarray(v) for k, v in OPTS[opts].items()}
  if "where" in kw:
    kw["where"] = jnp.asarray(kw["where"])
  labels = jnp.asarray(labels)
  for reduction in REDUCTIONS:
    g = jnp.asarray(cotangent(reduction))

    def objective(fn, reduction=reduction, g=g):
      def f(z, t, hp):
        return jnp.sum(g * fn(z, t, reduction=reduction, **kw, **hp))
      return f

    argnums = (0, 2) if kind == "int" else (0, 1, 2)
    val, grads = jax.value_and_grad(objective(js.cross_entropy),
                                    argnums)(jnp.asarray(z), labels, hp)
    pval, pgrads = jax.value_and_grad(objective(plain_cross_entropy),
                                      argnums)(jnp.asarray(z), labels, hp)
    chex.assert_trees_all_close(val, pval, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(grads, pgrads, rtol=2e-5, atol=2e-6)
    chex.assert_trees_all_equal_dtypes(grads, pgrads)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ("int", "prob"))
@pytest.mark.parametrize("dtype,reduction", ((jnp.float32, "mean"),
                                             (jnp.float64, "none")))
def test_check_grads(kind, dtype, reduction):
  z, labels, kw = setup(kind, "class")
  hp0 = OPTS["all"]

  def f(z, t, eps, zl, cap, w):
    # Finite differences must not move target mass onto masked classes.
    lab = labels if kind == "int" else jnp.where(kw["where"], t, 0.0)
    return js.cross_entropy(z, lab, label_smoothing=eps, z_loss=zl,
                            soft_cap=cap, class_weights=w,
                            reduction=reduction, **kw)

  with jax.enable_x64(dtype == jnp.float64):
    args = tuple(jnp.asarray(a, dtype) for a in (
        z, T_MASKED, hp0["label_smoothing"], hp0["z_loss"],
        hp0["soft_cap"], hp0["class_weights"]))
    eps = 1e-3 if dtype == jnp.float32 else 1e-6
    check_grads(f, args, order=1, modes=["rev"], eps=eps)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ("int", "prob"))
@pytest.mark.parametrize("opts", ("all",))
def test_reverse_over_reverse(kind, opts):
  z, labels, kw = setup(kind, "class")
  with jax.enable_x64(True):
    hp = {k: jnp.asarray(v, jnp.float64) for k, v in OPTS[opts].items()}
    labels = jnp.asarray(labels, None if kind == "int" else jnp.float64)
    kw["where"] = jnp.asarray(kw["where"])
    zz = jnp.asarray(z[:3], jnp.float64)
    v = jnp.asarray(_rng(9).standard_normal(zz.shape))

    def objective(fn):
      return lambda z: fn(z, labels[:3], where=kw["where"][:3], **hp)

    @jax.jit
    def second_order(z):
      out = []
      for fn in (js.cross_entropy, plain_cross_entropy):
        f = objective(fn)
        out.append((jax.jacrev(jax.grad(f))(z),
                    jax.grad(lambda z, f=f: jnp.vdot(jax.grad(f)(z), v))(z)))
      return out

    (hess, hvp), (phess, phvp) = second_order(zz)
    chex.assert_trees_all_close(hess, phess, rtol=1e-9, atol=1e-12)
    assert float(jnp.max(jnp.abs(hess))) > 1e-3
    chex.assert_trees_all_close(hvp, phvp, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("opts", ("plain", "zloss", "cap", "weights"))
def test_second_order_where_the_label_is_the_top_class(opts):
  # log s is log1p(r_y + expm1(z_y - m)) there: exact, and its derivative
  # in z_y kept (a log1p(r_y) alone made z_y a constant: the Hessian of
  # [0, 0] with label 0 came out 0.375, not 0.25). Rows: label on top,
  # on a tie at the top, and below it.
  z = _rng(4).standard_normal((4, 5))
  z[2, 3] = z[2].max() + 1.0
  z[2, 1] = z[2, 3]
  z[0, 0] = 30.0
  y = np.concatenate([np.argmax(z[:3], 1), [int(np.argmin(z[3]))]])
  assert y[2] in (1, 3)
  with jax.enable_x64(True):
    hp = {k: jnp.asarray(v[:5] if k == "class_weights" else v, jnp.float64)
          for k, v in OPTS[opts].items()}
    zz, yy = jnp.asarray(z), jnp.asarray(y)
    hess = [jax.jacrev(jax.grad(lambda z, fn=fn: fn(z, yy, **hp)))(zz)
            for fn in (js.cross_entropy, plain_cross_entropy)]
    chex.assert_trees_all_close(*hess, rtol=1e-9, atol=1e-12)
    hp.pop("class_weights", None)
    zero, y0 = jnp.zeros((1, 2)), jnp.array([0])
    np.testing.assert_allclose(
        jax.hessian(lambda z: js.cross_entropy(z, y0, **hp))(zero),
        jax.hessian(lambda z: plain_cross_entropy(z, y0, **hp))(zero),
        rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------
# dtypes


@pytest.mark.slow
@pytest.mark.parametrize("kind", ("int", "prob"))
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("opts", ("plain", "all"))
def test_low_precision_against_float64(kind, dtype, opts):
  z, labels, kw = setup(kind, "class")
  kw.update(OPTS[opts])
  zl = jnp.asarray(z, dtype)
  z64 = np.asarray(zl.astype(jnp.float32), np.float64)
  lab = jnp.asarray(labels if kind == "int" else labels.astype(dtype))
  lab64 = (labels if kind == "int"
           else np.asarray(lab.astype(jnp.float32), np.float64))
  for reduction in ("mean", "none"):
    g = cotangent(reduction)
    out, dz, dt = lib_vjp(js.cross_entropy, zl, lab, jnp.asarray(g), kind,
                          reduction=reduction, **kw)
    chex.assert_type(out, jnp.float32)
    chex.assert_type(dz, dtype)
    expected = ref.cross_entropy(z64, lab64, reduction=reduction, **kw)
    # float32 accumulation of the rounded inputs: float32-accurate loss.
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    edz, edt = ref.cross_entropy_vjp(z64, lab64, g, reduction=reduction,
                                     **kw)
    assert_close(dz, edz, dtype, np.max(np.abs(edz)))
    if kind == "prob":
      chex.assert_type(dt, dtype)
      assert_close(dt, edt, dtype, np.max(np.abs(edt)))


def test_float64_logits_give_float64_loss_and_float32_stays():
  chex.assert_type(js.cross_entropy(Z, Y), jnp.float32)
  with jax.enable_x64(True):
    chex.assert_type(js.cross_entropy(jnp.asarray(Z, jnp.float64), Y),
                     jnp.float64)
    # float32 logits with float64 probabilities: the gradient of each
    # input comes back in that input's dtype.
    dz, dt = jax.grad(js.cross_entropy, (0, 1))(
        jnp.asarray(Z), jnp.asarray(T, jnp.float64))
    chex.assert_type([dz, dt], [jnp.float32, jnp.float64])


# --------------------------------------------------------------------------
# transformations


@pytest.mark.slow
@pytest.mark.parametrize("kind", ("int", "prob"))
@pytest.mark.parametrize("transform", ("eager", "jit", "vmap"))
def test_eager_jit_vmap(kind, transform):
  zb = np.stack([Z, Z[::-1] * 0.5])
  lb = np.stack([Y, Y[::-1]] if kind == "int" else [T, T[::-1]])
  kw = dict(OPTS["all"], where=CLASS_MASK)

  def f(z, t):
    if kind == "int":
      val, dz = jax.value_and_grad(js.cross_entropy)(z, t, **kw)
      return val, dz, jnp.zeros(())
    val, (dz, dt) = jax.value_and_grad(js.cross_entropy, (0, 1))(z, t, **kw)
    return val, dz, dt

  if transform == "vmap":
    val, dz, dt = jax.vmap(f)(jnp.asarray(zb), jnp.asarray(lb))
  else:
    fn = jax.jit(f) if transform == "jit" else f
    outs = [fn(jnp.asarray(zb[i]), jnp.asarray(lb[i])) for i in range(2)]
    val, dz, dt = (jnp.stack(o) for o in zip(*outs, strict=True))
  for i in range(2):
    np.testing.assert_allclose(val[i], ref.cross_entropy(zb[i], lb[i], **kw),
                               rtol=1e-5)
    edz, edt = ref.cross_entropy_vjp(zb[i], lb[i], **kw)
    np.testing.assert_allclose(dz[i], edz, rtol=1e-5, atol=1e-6)
    if kind == "prob":
      np.testing.assert_allclose(dt[i], edt, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("axis", (0, (0, 2), (1, 2), -1))
@pytest.mark.parametrize("kind", ("int", "prob"))
def test_class_axes(axis, kind):
  shape = (3, 2, 4)
  z = (2 * _rng(4).standard_normal(shape)).astype(np.float32)
  axes = ref.normalize_axes(axis, 3)
  batch = tuple(s for a, s in enumerate(shape) if a not in axes)
  ncls = int(np.prod([shape[a] for a in axes]))
  if kind == "int":
    labels = _rng(5).integers(0, ncls, batch).astype(np.int32)
  else:
    labels = _rng(5).dirichlet(np.ones(shape[-1]), shape[:-1]).astype(
        np.float32)
  g = cotangent("none", batch)
  kw = {"label_smoothing": 0.1, "reduction": "none"}
  out, dz, dt = lib_vjp(js.cross_entropy, jnp.asarray(z), jnp.asarray(labels),
                        jnp.asarray(g), kind, jit=True, axis=axis, **kw)
  chex.assert_shape(out, batch)
  np.testing.assert_allclose(out, ref.cross_entropy(z, labels, axis=axis,
                                                    **kw), rtol=1e-5)
  edz, edt = ref.cross_entropy_vjp(z, labels, g, axis=axis, **kw)
  np.testing.assert_allclose(dz, edz, rtol=1e-5, atol=1e-6)
  if kind == "prob":
    np.testing.assert_allclose(dt, edt, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------
# formulas spelled out


def test_integer_formula_by_hand():
  # l = (1-eps) w_y nll_y + eps/K sum_c w_c nll_c ; mean / sum w_y.
  z = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
  y = np.array([2, 0])
  w = np.array([0.5, 2.0, 1.0])
  eps = 0.3
  lp = z - np.log(np.sum(np.exp(z), -1, keepdims=True))
  rows = [(1 - eps) * w[y[i]] * -lp[i, y[i]] + eps / 3 * np.sum(w * -lp[i])
          for i in range(2)]
  expected = sum(rows) / (w[2] + w[0])
  out = CE(jnp.asarray(z, jnp.float32), y, label_smoothing=eps,
                         class_weights=w)
  np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_smoothing_spreads_over_the_support_only():
  z = jnp.array([[0.0, 0.0, -jnp.inf, -jnp.inf]])
  # K = 2: 0.5 log 2 + 0.25 (log 2 + log 2) = log 2 (PyTorch: +inf).
  out = CE(z, jnp.array([0]), label_smoothing=0.5)
  np.testing.assert_allclose(out, np.log(2.0), rtol=1e-6)
  masked = CE(jnp.zeros((1, 4)), jnp.array([0]),
                            label_smoothing=0.5,
                            where=jnp.array([[True, True, False, False]]))
  np.testing.assert_allclose(masked, np.log(2.0), rtol=1e-6)
  dz = CE_GRAD(z, jnp.array([0]), label_smoothing=0.5)
  # p = (1/2, 1/2), target (3/4, 1/4): gradient (-1/4, 1/4, 0, 0).
  np.testing.assert_allclose(dz, [[-0.25, 0.25, 0.0, 0.0]], atol=1e-7)
  t = jnp.array([[0.5, 0.5, 0.0, 0.0]])
  np.testing.assert_allclose(
      CE(z, t, label_smoothing=0.5), np.log(2.0), rtol=1e-6)


def test_z_loss_and_soft_cap_by_hand():
  z = np.array([[4.0, -1.0, 2.0], [0.5, 0.5, -3.0], [1.0, 2.0, 3.0]])
  y = np.array([0, 2, 1])
  cap, zl = 2.5, 0.1
  zc = cap * np.tanh(z / cap)
  lse = np.log(np.sum(np.exp(zc), -1))
  ce = lse - zc[np.arange(3), y]
  w = np.array([1.0, 3.0, 0.5])
  # z-loss is averaged over counted rows, unweighted; ce over sum w_y.
  expected = np.sum(w[y] * ce) / np.sum(w[y]) + zl * np.mean(lse ** 2)
  out = CE(jnp.asarray(z, jnp.float32), y, soft_cap=cap,
                         z_loss=zl, class_weights=w)
  np.testing.assert_allclose(out, expected, rtol=1e-6)
  none = CE(jnp.asarray(z, jnp.float32), y, soft_cap=cap,
                          z_loss=zl, reduction="none")
  np.testing.assert_allclose(none, ce + zl * lse ** 2, rtol=1e-6)


def test_soft_cap_keeps_minus_inf():
  z = jnp.array([[1.0, -jnp.inf, 2.0]])
  out = CE(z, jnp.array([0]), soft_cap=1.0, label_smoothing=0.2)
  zc = np.tanh(np.array([1.0, 2.0]))
  nll = np.log(np.sum(np.exp(zc))) - zc
  np.testing.assert_allclose(out, 0.8 * nll[0] + 0.1 * nll.sum(), rtol=1e-6)
  dz = CE_GRAD(z, jnp.array([0]), soft_cap=1.0)
  assert dz[0, 1] == 0.0 and np.all(np.isfinite(dz))
  # The target at -inf: +inf loss, still a finite gradient.
  inf = CE(z, jnp.array([1]), soft_cap=1.0)
  assert inf == np.inf
  assert np.all(np.isfinite(CE_GRAD(
      z, jnp.array([1]), soft_cap=1.0)))


@pytest.mark.parametrize("api", ["cross_entropy", "linear", "aux_entropy"])
def test_soft_cap_gradient_at_a_plus_inf_logit(api):
  # d (cap tanh(z / cap)) / d cap -> 1 as z -> +inf: the cap's gradient
  # is finite (it was inf * 0 = NaN), that of the float64 reference.
  z = np.array([[np.inf, 1.0, 0.0], [0.5, 2.0, -1.0]], np.float32)
  y = jnp.array([1, 0])
  x = jnp.array([[1.0], [0.5]])
  w = jnp.array([[np.inf, 1.0, 0.0]])
  logits = ref.matmul(x, w) if api == "linear" else z

  def loss(cap):
    if api == "linear":
      return js.linear_cross_entropy(x, w, y, soft_cap=cap)
    if api == "aux_entropy":
      _, aux = js.cross_entropy(jnp.asarray(z), y, soft_cap=cap,
                                return_aux=True)
      return jnp.sum(aux.entropy)
    return js.cross_entropy(jnp.asarray(z), y, soft_cap=cap)

  def ref_loss(cap):
    if api != "aux_entropy":
      return ref.cross_entropy(logits, np.asarray(y), soft_cap=cap)
    zc = cap * np.tanh(logits.astype(np.float64) / cap)
    p = np.exp(zc - zc.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return -np.sum(p * np.log(p))

  h = 1e-6
  want = (ref_loss(2.0 + h) - ref_loss(2.0 - h)) / (2 * h)
  got = jax.grad(loss)(2.0)
  assert np.isfinite(got)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def _cap_slope64(u):
  """float64 ``tanh u - u (1 - tanh^2 u)``; ``2 u^3 / 3 - 8 u^5 / 15 +
  ...`` (the series of ``(1 - tanh^2 u)(sinh 2u - 2u) / 2``) below 0.5."""
  u = np.asarray(u, np.float64)
  v = 2 * np.clip(u, -0.5, 0.5)
  term, series = v ** 3 / 6, np.zeros_like(v)
  for n in range(1, 12):
    series, term = series + term, term * v * v / ((2 * n + 2) * (2 * n + 3))
  small = (1 - np.tanh(u) ** 2) * series / 2
  with np.errstate(invalid="ignore", over="ignore"):
    big = np.tanh(u) - np.where(np.isinf(u), 0.0, u * (1 - np.tanh(u) ** 2))
  return np.where(np.abs(u) < 0.5, small, big)


@pytest.mark.parametrize("api", ["cross_entropy", "linear"])
@pytest.mark.parametrize("cap", [3.0, 30.0, 1e3, 1e4, 1e-30])
def test_soft_cap_gradient_far_from_the_cap(api, cap):
  # d zc / d cap = tanh u - u (1 - tanh^2 u), u = z / cap: for a cap far
  # above the logits the difference cancels (2 u^3 / 3: 17% off at
  # cap = 1e3, 0 at 1e4); for a tiny cap u = -inf made u (1 - tanh^2) NaN.
  z = np.array([[1.0, 2.0, -0.5], [0.25, -1.0, 3.0]], np.float32)
  if cap < 1:
    z = z * np.float32(1e10)   # u = +-inf in float32, +-1e40 in float64
  y = np.array([0, 2])

  def loss(c):
    if api == "linear":
      return js.linear_cross_entropy(jnp.asarray(z), jnp.eye(3),
                                     jnp.asarray(y), soft_cap=c)
    return js.cross_entropy(jnp.asarray(z), jnp.asarray(y), soft_cap=c)

  u = z.astype(np.float64) / cap
  gc, _ = ref.cross_entropy_vjp(cap * np.tanh(u), y)   # d loss / d zc
  want = np.sum(gc * _cap_slope64(u))
  got = jax.grad(loss)(jnp.float32(cap))
  np.testing.assert_allclose(got, want, rtol=2e-5)


def test_probability_formula_and_ignore_index_does_not_apply():
  z = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
  t = np.array([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
  w = np.array([0.5, 2.0, 1.0])
  eps = 0.4
  lp = z - np.log(np.sum(np.exp(z), -1, keepdims=True))
  q = (1 - eps) * t + eps / 3
  expected = np.mean(-np.sum(w * q * lp, -1))
  for kw in ({}, {"ignore_index": 0}):
    out = CE(jnp.asarray(z, jnp.float32),
                           jnp.asarray(t, jnp.float32), label_smoothing=eps,
                           class_weights=w, **kw)
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_all_ignored_mean_is_zero_with_zero_gradient():
  z = jnp.asarray(Z)
  cases = [
      (jnp.full((N,), IGNORE, jnp.int32), {"ignore_index": IGNORE}),
      (jnp.asarray(Y), {"where": jnp.zeros((N,), bool)}),
      (jnp.asarray(Y), {"where": jnp.zeros((N, C), bool)}),
      (jnp.asarray(T), {"where": jnp.zeros((N,), bool)}),
  ]
  for labels, kw in cases:
    for opts in ("plain", "all"):
      val, dz = jax.value_and_grad(js.cross_entropy)(z, labels, **kw,
                                                     **OPTS[opts])
      assert val == 0.0
      np.testing.assert_array_equal(dz, 0.0)


# --------------------------------------------------------------------------
# special values (the README table)


def special_batch():
  """Rows of a class-masked integer batch, one per cell of the table."""
  z = np.array(Z[:1].repeat(10, 0))
  y = np.array([1] * 10, np.int32)
  mask = np.ones((10, C), bool)
  z[1, 2] = np.nan  # ignored row holding NaN
  y[1] = IGNORE
  z[2, 3] = np.nan                          # NaN in a counted row
  z[3, 0] = np.inf                          # +inf in a counted row
  z[4, 1] = -np.inf                         # target logit -inf
  mask[5, 1] = False                        # masked target class
  z[6] = -np.inf                            # no class left (-inf)
  mask[7] = False  # no class left (masked)
  z[7, 0] = np.nan
  z[8, [0, 3]] = -np.inf                    # -inf non-target logits
  mask[9, [2, 4]] = False  # masked NaN non-target
  z[9, 2] = np.nan
  return z, y, mask


@pytest.mark.parametrize("opts,jit", (("plain", False), ("all", True)))
def test_special_values_per_row(opts, jit):
  z, y, mask = special_batch()
  kw = dict(OPTS[opts], where=mask, ignore_index=IGNORE, reduction="none")

  def f(z):
    return js.cross_entropy(z, y, **kw)

  out, vjp = jax.vjp(jax.jit(f) if jit else f, jnp.asarray(z))
  (dz,) = vjp(jnp.ones((10,), jnp.float32))
  out, dz = np.asarray(out), np.asarray(dz)
  assert np.all(np.isfinite(out[[0, 8, 9]]))
  assert out[1] == 0.0 and np.all(dz[1] == 0.0)            # ignored + NaN
  assert np.isnan(out[2]) and np.all(np.isnan(dz[2]))       # NaN
  if "soft_cap" not in kw:   # the cap maps +inf to soft_cap first
    assert np.isnan(out[3]) and np.all(np.isnan(dz[3]))     # +inf
  assert out[4] == np.inf and np.all(np.isfinite(dz[4]))    # -inf target
  assert out[5] == np.inf and np.all(np.isfinite(dz[5]))    # masked target
  assert dz[5, 1] == 0.0
  assert out[6] == 0.0 and np.all(dz[6] == 0.0)             # all -inf
  assert out[7] == 0.0 and np.all(dz[7] == 0.0)             # all masked
  assert np.all(dz[8, [0, 3]] == 0.0)                       # -inf non-target
  assert np.all(dz[9, [2, 4]] == 0.0)
  assert np.all(np.isfinite(dz[[0, 1, 6, 7, 8, 9]]))
  # Row by row the reference agrees (values and gradients).
  np.testing.assert_allclose(out, ref.cross_entropy(z, y, **kw), rtol=1e-5)
  edz, _ = ref.cross_entropy_vjp(z, y, np.ones(10), **kw)
  np.testing.assert_allclose(dz, edz, rtol=1e-5, atol=1e-6)
  # An uncounted NaN row leaves the others untouched.
  kw["where"] = mask[[0, 8]]
  clean = js.cross_entropy(jnp.asarray(z[[0, 8]]), y[[0, 8]], **kw)
  np.testing.assert_array_equal(clean, out[[0, 8]])


@pytest.mark.parametrize("reduction", ("mean", "sum"))
def test_nan_row_poisons_the_loss_but_only_its_own_gradient(reduction):
  z = np.array(Z)
  z[2, 1] = np.nan
  val, dz = jax.value_and_grad(js.cross_entropy)(jnp.asarray(z), Y,
                                                 reduction=reduction)
  dz = np.asarray(dz)
  assert np.isnan(val)
  assert np.all(np.isnan(dz[2]))
  rest = [0, 1, 3, 4, 5]
  _, edz = jax.value_and_grad(js.cross_entropy)(jnp.asarray(Z), Y,
                                                reduction=reduction)
  edz = np.asarray(edz)
  np.testing.assert_allclose(dz[rest], edz[rest], rtol=1e-6)


def test_masked_rows_ignore_everything_they_hold():
  z = np.array(Z)
  z[2] = [np.nan, np.inf, -np.inf, 1.0, np.nan]
  y = np.array(Y)
  y[2] = 99                                # bad label on a masked row
  for kind, labels in (("int", y), ("prob", T)):
    val, dz = jax.value_and_grad(js.cross_entropy)(
        jnp.asarray(z), jnp.asarray(labels), where=ROW_MASK)
    expected = ref.cross_entropy(Z, Y if kind == "int" else T,
                                 where=ROW_MASK)
    np.testing.assert_allclose(val, expected, rtol=1e-6)
    np.testing.assert_array_equal(dz[2], 0.0)
    assert np.all(np.isfinite(dz))


def test_probability_special_values():
  z = np.array(Z[:1].repeat(6, 0))
  t = np.array(T[:1].repeat(6, 0))
  mask = np.ones((6, C), bool)
  z[1, 2] = -np.inf                                       # -inf, no mass
  t[1, 2] = 0.0
  t[1] /= t[1].sum()
  z[2, 2] = -np.inf                                       # -inf with mass
  mask[3, 4] = False                                      # masked, mass
  z[4] = -np.inf                                          # no class left
  z[5, 0] = np.nan                                        # NaN row
  out, vjp = jax.vjp(lambda z, t: js.cross_entropy(z, t, where=mask,
                                                   reduction="none"),
                     jnp.asarray(z), jnp.asarray(t))
  dz, dt = (np.asarray(a) for a in vjp(jnp.ones((6,), jnp.float32)))
  assert np.all(np.isfinite(out[:2])) and dz[1, 2] == 0.0
  assert out[2] == np.inf and out[3] == np.inf
  assert np.all(np.isfinite(dz[:5])) and np.all(np.isfinite(dt[:5]))
  assert out[4] == 0.0 and np.all(dz[4] == 0.0) and np.all(dt[4] == 0.0)
  assert np.isnan(out[5]) and np.all(np.isnan(dz[5]))
  kw = {"where": mask, "reduction": "none"}
  np.testing.assert_allclose(out, ref.cross_entropy(z, t, **kw), rtol=1e-5)
  edz, edt = ref.cross_entropy_vjp(z, t, np.ones(6), **kw)
  np.testing.assert_allclose(dz, edz, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dt, edt, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_minus_inf_non_target_logits_are_harmless():
  z = np.array(Z)
  z[:, 3] = -np.inf
  y = np.array([1, 4, 0, 2, 0, 1], np.int32)
  for labels in (y, np.where(np.arange(C) == 3, 0.0, T) / np.sum(
      np.where(np.arange(C) == 3, 0.0, T), -1, keepdims=True)):
    for opts in OPTS:
      val, dz = jax.value_and_grad(js.cross_entropy)(
          jnp.asarray(z), jnp.asarray(labels, None if labels.dtype == np.int32
                                      else jnp.float32), **OPTS[opts])
      assert np.isfinite(val)
      assert np.all(dz[:, 3] == 0.0) and np.all(np.isfinite(dz))
      np.testing.assert_allclose(
          val, ref.cross_entropy(z, labels, **OPTS[opts]), rtol=1e-5)


@pytest.mark.parametrize("kind", ("int", "prob"))
def test_masked_cases_under_debug_nans_in_jit(kind):
  z, y, mask = special_batch()
  keep = [0, 4, 5, 6, 7, 8, 9]
  labels = (y[keep] if kind == "int" else
            np.where(mask[keep], T[[0, 1, 2, 3, 4, 5, 0]], 0.0).astype(
                np.float32))
  z = np.nan_to_num(z[keep], nan=0.0)

  def f(z, t):
    out = js.cross_entropy(z, t, where=mask[keep], reduction="none",
                           **OPTS["all"])
    return jnp.sum(jnp.where(jnp.isfinite(out), out, 0.0))

  argnums = 0 if kind == "int" else (0, 1)
  with jax.debug_nans(True):
    val, grads = jax.jit(jax.value_and_grad(f, argnums))(
        jnp.asarray(z), jnp.asarray(labels))
    jax.block_until_ready(grads)
  assert np.isfinite(val)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


# --------------------------------------------------------------------------
# bad labels and argument errors


def test_bad_label_is_nan_for_its_row_under_jit():
  y = np.array(Y)
  y[3] = C
  y[5] = -1
  f = jax.jit(lambda z, y: js.cross_entropy(z, y, reduction="none"))
  out = np.asarray(f(jnp.asarray(Z), y))
  dz = np.asarray(jax.jit(jax.grad(lambda z, y: js.cross_entropy(z, y)))(
      jnp.asarray(Z), y))
  assert np.isnan(out[3]) and np.isnan(out[5])
  np.testing.assert_allclose(out[[0, 1, 2, 4]],
                             ref.cross_entropy(Z, Y, reduction="none")[
                                 [0, 1, 2, 4]], rtol=1e-6)
  assert np.all(np.isnan(dz[[3, 5]]))
  assert np.all(np.isfinite(dz[[0, 1, 2, 4]]))


@pytest.mark.parametrize("fn", (js.cross_entropy, js.nll_loss,
                                js.softmax_cross_entropy_with_integer_labels))
def test_bad_concrete_label_raises_with_label_and_position(fn):
  z = jnp.zeros((2, 3, 4))
  y = np.array([[0, 1, 2], [3, 9, -2]])
  with pytest.raises(ValueError, match=r"label 9 at position \(1, 1\)"):
    fn(z, y)
  ok = np.array([[0, 1, 2], [3, 0, 1]])
  assert np.isfinite(fn(z, ok)).all()


def test_ignore_index_and_masked_rows_are_not_bad_labels():
  y = np.array(Y)
  y[2] = IGNORE
  assert np.isfinite(js.cross_entropy(Z, y, ignore_index=IGNORE))
  y[2] = 17
  assert np.isfinite(js.cross_entropy(Z, y, where=ROW_MASK))
  with pytest.raises(ValueError, match="label 17 at position \\(2,\\)"):
    js.cross_entropy(Z, y)


def test_label_check_follows_uncounted_rows_of_a_class_mask():
  """A row whose classes are all masked is uncounted: loss 0 whatever it
  holds (its label included), under jit and eagerly alike."""
  y = np.array(Y)
  y[2] = 17
  mask = np.ones((N, C), bool)
  mask[2] = False
  jitted = jax.jit(lambda z, y: js.cross_entropy(z, y, where=mask,
                                                 reduction="none"))(Z, y)
  assert jitted[2] == 0.0
  eager = js.cross_entropy(Z, y, where=mask, reduction="none")
  np.testing.assert_array_equal(eager, jitted)


@pytest.mark.parametrize("fn", (js.cross_entropy, js.nll_loss))
def test_check_labels_under_checkify(fn):
  f = jax.jit(lambda z, y: fn(z, y, ignore_index=IGNORE, check_labels=True))
  checked = checkify.checkify(f)
  y = np.array(Y_IGN)
  err, out = checked(jnp.asarray(Z), y)
  assert err.get() is None and np.isfinite(out)
  y[4] = 42
  err, out = checked(jnp.asarray(Z), y)
  assert np.isnan(out)
  with pytest.raises(ValueError, match=r"label 42 at position \[?4"):
    err.throw()
  assert issubclass(checkify.JaxRuntimeError, ValueError)


def test_argument_errors_say_expected_and_got():
  z = jnp.asarray(Z)
  with pytest.raises(TypeError, match="floating.*int32"):
    js.cross_entropy(jnp.ones((2, 3), jnp.int32), jnp.array([0, 1]))
  with pytest.raises(TypeError, match="bool"):
    js.cross_entropy(z, jnp.ones((N,), bool))
  with pytest.raises(ValueError, match=r"\(6,\).*\(5,\)"):
    js.cross_entropy(z, jnp.zeros((5,), jnp.int32))
  with pytest.raises(ValueError, match=r"\(6, 5\).*\(6, 4\)"):
    js.cross_entropy(z, jnp.zeros((N, 4)))
  with pytest.raises(ValueError, match="out of range.*rank 2"):
    js.cross_entropy(z, Y, axis=2)
  with pytest.raises(ValueError, match="'avg'"):
    js.cross_entropy(z, Y, reduction="avg")
  with pytest.raises(ValueError, match=r"\(4,\)"):
    js.cross_entropy(z, Y, where=jnp.ones((4,), bool))
  with pytest.raises(TypeError, match="boolean"):
    js.cross_entropy(z, Y, where=jnp.ones((N,), jnp.int32))
  with pytest.raises(ValueError, match=r"\(5,\).*\(3,\)"):
    js.cross_entropy(z, Y, class_weights=jnp.ones((3,)))
  with pytest.raises(ValueError, match=r"scalar.*\(2,\)"):
    js.cross_entropy(z, Y, label_smoothing=jnp.ones((2,)))
  with pytest.raises(ValueError, match="scalar"):
    js.cross_entropy(jnp.ones(()), jnp.zeros((), jnp.int32))
  with pytest.raises(TypeError, match="integer.*float32"):
    js.nll_loss(z, jnp.asarray(T))
  with pytest.raises(TypeError, match="probabilities.*bool"):
    js.softmax_cross_entropy(z, jnp.ones((N, C), bool))
  with pytest.raises(ValueError, match=r"\(6,\).*broadcast.*\(6, 5\)"):
    js.softmax_cross_entropy(z, jnp.asarray(Y))
  with pytest.raises(ValueError, match="'avg'"):
    js.nll_loss(z, Y, reduction="avg")


# --------------------------------------------------------------------------
# precision


@pytest.mark.parametrize("center", (1000.0, -1000.0))
@pytest.mark.parametrize("kind", ("int", "prob"))
def test_float32_precision_near_1000(center, kind):
  z = (center + _rng(6).standard_normal((64, 16))).astype(np.float32)
  if kind == "int":
    labels = _rng(7).integers(0, 16, (64,)).astype(np.int32)
  else:
    labels = _rng(7).dirichlet(np.ones(16), 64).astype(np.float32)
  out = CE(z, labels, reduction="none")
  ulp_close(out, ref.cross_entropy(z, labels, reduction="none"), 4)
  mean = CE(z, labels)
  ulp_close(mean, ref.cross_entropy(z, labels), 4)
  sce = (js.softmax_cross_entropy_with_integer_labels(z, labels)
         if kind == "int" else js.softmax_cross_entropy(z, labels))
  ulp_close(sce, ref.cross_entropy(z, labels, reduction="none"), 4)


@pytest.mark.parametrize("center", (1000.0, -1000.0, 1e8))
@pytest.mark.parametrize("kind", ("int", "prob"))
def test_float32_gradient_precision_at_large_logits(center, kind):
  """The gradient follows the forward's policy: ``p = exp((z - m) - log s)``
  is float32-accurate however large the logits (``exp(z - lse)`` loses
  ``|z| * 2**-24`` in the exponent: 6e-5 at 1000, everything at 1e8)."""
  z = (center + _rng(6).standard_normal((8, 16))).astype(np.float32)
  if kind == "int":
    labels = _rng(7).integers(0, 16, (8,)).astype(np.int32)
  else:
    labels = _rng(7).dirichlet(np.ones(16), 8).astype(np.float32)
  _, dz, dt = lib_vjp(js.cross_entropy, jnp.asarray(z), jnp.asarray(labels),
                      jnp.float32(1.0), kind, jit=True, reduction="sum")
  edz, edt = ref.cross_entropy_vjp(z, labels, reduction="sum")
  np.testing.assert_allclose(dz, edz, rtol=0, atol=1e-6)
  if kind == "prob":
    # d/dt = -log p: float32-accurate relative to its own size.
    np.testing.assert_allclose(dt, edt, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------
# hyperparameters as traced arrays


@pytest.mark.slow
@pytest.mark.parametrize("kind", ("int", "prob"))
@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_traced_hyperparameters_under_jit(kind, reduction):
  z, labels, kw = setup(kind, "class")
  labels = jnp.asarray(labels)
  g = jnp.asarray(cotangent(reduction))
  hp = {k: jnp.asarray(v) for k, v in OPTS["all"].items()}

  def objective(fn):
    def f(z, t, hp):
      return jnp.sum(g * fn(z, t, reduction=reduction, **kw, **hp))
    return f

  argnums = (0, 2) if kind == "int" else (0, 1, 2)
  val, grads = jax.jit(jax.value_and_grad(objective(js.cross_entropy),
                                          argnums))(jnp.asarray(z), labels, hp)
  pval, pgrads = jax.value_and_grad(objective(plain_cross_entropy),
                                    argnums)(jnp.asarray(z), labels, hp)
  chex.assert_trees_all_close(val, pval, rtol=1e-5)
  chex.assert_trees_all_close(grads, pgrads, rtol=2e-5, atol=2e-6)
  # Every hyperparameter gradient is non-trivial.
  for leaf in jax.tree.leaves(grads[-1]):
    assert float(jnp.max(jnp.abs(leaf))) > 1e-4
  # A schedule: one compiled function, two values of each hyperparameter.
  f = jax.jit(objective(js.cross_entropy))
  for scale in (0.0, 0.5):
    # (Class weights that are all 0 would make the mean 0 / 0 = NaN.)
    hp2 = {k: (v + scale if k in ("soft_cap", "class_weights")
               else v * scale) for k, v in hp.items()}
    np.testing.assert_allclose(
        f(jnp.asarray(z), labels, hp2),
        np.sum(np.asarray(g) * ref.cross_entropy(
            z, np.asarray(labels), reduction=reduction, **kw,
            **{k: np.asarray(v) for k, v in hp2.items()})), rtol=1e-5)


# --------------------------------------------------------------------------
# optax compatibility


def _optax_case(axis, where_kind, kind):
  shape = (3, 4, 5)
  z = (2 * _rng(8).standard_normal(shape)).astype(np.float32)
  axes = ref.normalize_axes(axis, 3)
  batch = tuple(s for a, s in enumerate(shape) if a not in axes)
  where = None
  cmask = np.ones(shape, bool)
  if where_kind == "row":
    where = _rng(9).random(batch) < 0.7
  elif where_kind == "class":
    cmask = _rng(9).random(shape) < 0.7
    where = cmask
  axes = ref.class_axes(axis, 3)   # flattened in the given order
  mr = ref.to_rows(cmask, axes)[0]
  mr[:, 0] = True                              # no empty rows
  if kind == "int":
    rng = _rng(10)
    labels = np.array([rng.choice(np.flatnonzero(m)) for m in mr])
    labels = labels.reshape(batch).astype(np.int32)
  else:
    t = np.where(mr, _rng(10).random(mr.shape), 0.0)
    labels = ref.from_rows(t / t.sum(-1, keepdims=True), shape,
                           tuple(a for a in range(3) if a not in axes) + axes)
    labels = labels.astype(np.float32)
  if where_kind == "class":
    perm = tuple(a for a in range(3) if a not in axes) + axes
    where = ref.from_rows(mr, shape, perm)
  return z, labels, where, batch


@pytest.mark.parametrize("kind", ("int", "prob"))
@pytest.mark.parametrize("axis", (-1, (1, 2), (2, 0)))
@pytest.mark.parametrize("where_kind", ("none", "row", "class"))
def test_optax_equality(kind, axis, where_kind):
  z, labels, where, batch = _optax_case(axis, where_kind, kind)
  ours = (js.softmax_cross_entropy_with_integer_labels if kind == "int"
          else js.softmax_cross_entropy)
  theirs = (optax.softmax_cross_entropy_with_integer_labels if kind == "int"
            else optax.softmax_cross_entropy)
  g = jnp.asarray(cotangent("none", batch))
  args = (jnp.asarray(z), jnp.asarray(labels))
  where = None if where is None else jnp.asarray(where)
  @jax.jit
  def both(z, t, g):
    res = []
    for fn in (ours, theirs):
      if kind == "int":
        out, vjp = jax.vjp(lambda z, fn=fn: fn(z, t, axis, where), z)
      else:
        out, vjp = jax.vjp(lambda z, t, fn=fn: fn(z, t, axis, where), z, t)
      res.append((out, vjp(g)))
    return res

  (out, grads), (oout, ograds) = both(*args, g)
  chex.assert_shape(out, batch)
  chex.assert_trees_all_close(out, oout, rtol=1e-5, atol=1e-6)
  # Gradients wherever optax's are finite (optax: NaN for the labels of
  # masked entries; ours 0).
  for mine, theirs_ in zip(grads, ograds, strict=True):
    ok = np.isfinite(np.asarray(theirs_))
    assert np.all(np.isfinite(np.asarray(mine)))
    np.testing.assert_allclose(np.asarray(mine)[ok], np.asarray(theirs_)[ok],
                               rtol=1e-5, atol=1e-6)
    assert np.any(ok)


OPTAX_NAMES = {
    "softmax_cross_entropy_with_integer_labels": (
        js.softmax_cross_entropy_with_integer_labels, "int"),
    "softmax_cross_entropy": (js.softmax_cross_entropy, "prob"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", OPTAX_NAMES)
@pytest.mark.parametrize("where_kind", ("none", "class"))
def test_optax_names_three_ways(name, where_kind):
  """Float64 reference, plain autodiff, check_grads; bf16/f16 dtypes."""
  fn, kind = OPTAX_NAMES[name]
  z, labels, kw = setup(kind, where_kind)
  where = kw.get("where")
  g = cotangent("none")
  with jax.enable_x64(True):
    lab = jnp.asarray(labels, None if kind == "int" else jnp.float64)
    out, dz, dt = lib_vjp(fn, jnp.asarray(z, jnp.float64), lab,
                          jnp.asarray(g, jnp.float64), kind, where=where)
    chex.assert_type(out, jnp.float64)
    f64 = jnp.float64
    check_grads(lambda z: fn(z, lab, where=where),
                (jnp.asarray(z, f64),), order=1, modes=["rev"], eps=1e-6)
  kwr = {"where": where, "reduction": "none"}
  np.testing.assert_allclose(out, ref.cross_entropy(z, labels, **kwr),
                             rtol=1e-12)
  edz, edt = ref.cross_entropy_vjp(z, labels, g, **kwr)
  np.testing.assert_allclose(dz, edz, rtol=1e-11, atol=1e-13)
  if kind == "prob":
    np.testing.assert_allclose(dt, edt, rtol=1e-11, atol=1e-13)
  # Plain autodiff in float32, and check_grads in float32.
  jl, jg = jnp.asarray(labels), jnp.asarray(g)
  wj = None if where is None else jnp.asarray(where)
  argnums = (0,) if kind == "int" else (0, 1)
  val, grads = jax.value_and_grad(
      lambda z, t: jnp.sum(jg * fn(z, t, where=wj)), argnums)(
          jnp.asarray(z), jl)
  pval, pgrads = jax.value_and_grad(
      lambda z, t: jnp.sum(jg * plain_cross_entropy(z, t, where=wj,
                                                     reduction="none")),
      argnums)(jnp.asarray(z), jl)
  chex.assert_trees_all_close(val, pval, rtol=1e-5)
  chex.assert_trees_all_close(grads, pgrads, rtol=1e-5, atol=1e-6)
  check_grads(lambda z: fn(z, jl, where=wj), (jnp.asarray(z),), order=1,
              modes=["rev"], eps=1e-3)
  # Low precision: float32 loss, gradients in the input dtype.
  for dtype in LOW:
    zl = jnp.asarray(z, dtype)
    z64 = np.asarray(zl.astype(jnp.float32), np.float64)
    out, dz, _ = lib_vjp(fn, zl, jl, jg, kind, where=where)
    chex.assert_type([out, dz], [jnp.float32, dtype])
    np.testing.assert_allclose(out, ref.cross_entropy(z64, labels, **kwr),
                               rtol=1e-5, atol=1e-6)
    edz, _ = ref.cross_entropy_vjp(z64, labels, g, **kwr)
    assert_close(dz, edz, dtype, np.max(np.abs(edz)))


def test_optax_names_match_cross_entropy_none():
  for labels, fn in ((Y, js.softmax_cross_entropy_with_integer_labels),
                     (T, js.softmax_cross_entropy)):
    np.testing.assert_array_equal(
        fn(Z, labels), js.cross_entropy(Z, labels, reduction="none"))


def test_optax_departures():
  z = jnp.asarray(Z[:2])
  # Negative labels are NaN, not wrapped around.
  out = jax.jit(js.softmax_cross_entropy_with_integer_labels)(
      z, jnp.array([-1, 0]))
  assert np.isnan(out[0]) and np.isfinite(out[1])
  # -inf non-target logits with zero target mass: finite (optax: NaN).
  zi = z.at[:, 2].set(-jnp.inf)
  t = jnp.asarray(T[:2]).at[:, 2].set(0.0)
  assert np.all(np.isnan(optax.softmax_cross_entropy(zi, t)))
  np.testing.assert_allclose(js.softmax_cross_entropy(zi, t),
                             ref.softmax_cross_entropy(zi, t), rtol=1e-6)
  # Low precision: float32 loss (optax: input dtype).
  chex.assert_type(js.softmax_cross_entropy_with_integer_labels(
      z.astype(jnp.bfloat16), jnp.array([0, 1])), jnp.float32)


# --------------------------------------------------------------------------
# nll_loss


LP = np.asarray(js.log_softmax(Z)).astype(np.float32)
NLL_OPTS = {"plain": {}, "weights": {"class_weights": W}}


@pytest.mark.slow
@pytest.mark.parametrize("opts", NLL_OPTS)
@pytest.mark.parametrize("where_kind", ("none", "class", "row", "ignore"))
def test_nll_float64_matches_reference(opts, where_kind):
  _, labels, kw = setup("int", where_kind)
  kw.update(NLL_OPTS[opts])
  for reduction in REDUCTIONS:
    g = cotangent(reduction)
    with jax.enable_x64(True):
      out, vjp = jax.vjp(
          lambda lp, reduction=reduction: js.nll_loss(
              lp, labels, reduction=reduction, **kw),
          jnp.asarray(LP, jnp.float64))
      (d,) = vjp(jnp.asarray(g, jnp.float64))
      chex.assert_type([out, d], jnp.float64)
    np.testing.assert_allclose(
        out, ref.nll_loss(LP, labels, reduction=reduction, **kw),
        rtol=1e-12)
    np.testing.assert_allclose(
        d, ref.nll_loss_vjp(LP, labels, g, reduction=reduction, **kw),
        rtol=1e-12)


@pytest.mark.parametrize("where_kind", ("none", "row", "ignore"))
def test_nll_matches_plain_autodiff(where_kind):
  _, labels, kw = setup("int", where_kind)
  labels = jnp.asarray(labels)
  for reduction in REDUCTIONS:
    g = jnp.asarray(cotangent(reduction))

    def objective(fn, reduction=reduction, g=g):
      def f(lp, w):
        return jnp.sum(g * fn(lp, labels, class_weights=w,
                              reduction=reduction, **kw))
      return f

    lp0 = jnp.asarray(LP)
    val, grads = jax.value_and_grad(objective(js.nll_loss), (0, 1))(
        lp0, jnp.asarray(W))
    pval, pgrads = jax.value_and_grad(objective(plain_nll), (0, 1))(
        lp0, jnp.asarray(W))
    chex.assert_trees_all_close(val, pval, rtol=1e-6)
    chex.assert_trees_all_close(grads, pgrads, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", (jnp.float32, jnp.float64))
def test_nll_check_grads(dtype):
  with jax.enable_x64(dtype == jnp.float64):
    f = lambda lp, w: js.nll_loss(lp, Y_IGN, ignore_index=IGNORE,  # noqa: E731
                                  class_weights=w)
    eps = 1e-3 if dtype == jnp.float32 else 1e-6
    check_grads(f, (jnp.asarray(LP, dtype), jnp.asarray(W, dtype)), order=1,
                modes=["rev"], eps=eps)
    check_grads(lambda lp: js.nll_loss(lp, Y, reduction="none"),
                (jnp.asarray(LP, dtype),), order=1, modes=["rev"], eps=eps)


def test_nll_reverse_over_reverse_and_cross_entropy_composition():
  # nll_loss(log_softmax(z)) is cross_entropy(z): value, gradient, Hessian.
  with jax.enable_x64(True):
    z = jnp.asarray(Z[:3], jnp.float64)
    w = jnp.asarray(W, jnp.float64)

    def f(z):
      return js.nll_loss(js.log_softmax(z), Y[:3], class_weights=w)

    def g(z):
      return js.cross_entropy(z, Y[:3], class_weights=w)

    @jax.jit
    def derivatives(z):
      return [(fn(z), jax.grad(fn)(z), jax.jacrev(jax.grad(fn))(z))
              for fn in (f, g)]

    (val, grad, hess), (cval, cgrad, chess) = derivatives(z)
    chex.assert_trees_all_close(val, cval, rtol=1e-12)
    chex.assert_trees_all_close(grad, cgrad, rtol=1e-12)
    chex.assert_trees_all_close(hess, chess, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dtype", LOW)
def test_nll_low_precision(dtype):
  lp = jnp.asarray(LP, dtype)
  lp64 = np.asarray(lp.astype(jnp.float32), np.float64)
  out, vjp = jax.vjp(lambda lp: js.nll_loss(lp, Y, class_weights=W), lp)
  (d,) = vjp(jnp.float32(1.0))
  chex.assert_type(out, jnp.float32)
  chex.assert_type(d, dtype)
  np.testing.assert_allclose(out, ref.nll_loss(lp64, Y, class_weights=W),
                             rtol=1e-6)
  assert_close(d, ref.nll_loss_vjp(lp64, Y, class_weights=W), dtype)


@pytest.mark.parametrize("transform", ("eager", "jit", "vmap"))
def test_nll_eager_jit_vmap(transform):
  lpb = np.stack([LP, LP[::-1]])
  yb = np.stack([Y_IGN, Y_IGN[::-1]])

  def f(lp, y):
    return jax.value_and_grad(js.nll_loss)(lp, y, ignore_index=IGNORE)

  if transform == "vmap":
    val, d = jax.vmap(f)(jnp.asarray(lpb), jnp.asarray(yb))
  else:
    fn = jax.jit(f) if transform == "jit" else f
    outs = [fn(jnp.asarray(lpb[i]), jnp.asarray(yb[i])) for i in range(2)]
    val, d = (jnp.stack(o) for o in zip(*outs, strict=True))
  for i in range(2):
    np.testing.assert_allclose(
        val[i], ref.nll_loss(lpb[i], yb[i], ignore_index=IGNORE), rtol=1e-6)
    np.testing.assert_allclose(
        d[i], ref.nll_loss_vjp(lpb[i], yb[i], ignore_index=IGNORE),
        rtol=1e-6)


@pytest.mark.parametrize("jit", (False, True))
def test_nll_special_values(jit):
  lp = np.array(LP[:1].repeat(7, 0))
  y = np.array([1] * 7, np.int32)
  mask = np.ones((7, C), bool)
  lp[1, 2] = np.nan  # ignored row holding NaN
  y[1] = IGNORE
  lp[2, 1] = np.nan                            # NaN at the target
  lp[3, 1] = -np.inf                           # -inf target
  mask[4, 1] = False                           # masked target
  mask[5] = False  # all masked
  lp[5, 1] = np.nan
  lp[6, [0, 3]] = -np.inf                      # -inf elsewhere
  kw = {"where": mask, "ignore_index": IGNORE, "reduction": "none"}

  def f(lp):
    return js.nll_loss(lp, y, **kw)

  out, vjp = jax.vjp(jax.jit(f) if jit else f, jnp.asarray(lp))
  (d,) = vjp(jnp.ones((7,), jnp.float32))
  out, d = np.asarray(out), np.asarray(d)
  assert out[1] == 0.0 and np.all(d[1] == 0.0)
  assert np.isnan(out[2]) and np.all(np.isnan(d[2]))
  assert out[3] == np.inf and np.all(np.isfinite(d[3]))
  assert out[4] == np.inf and np.all(np.isfinite(d[4]))
  assert out[5] == 0.0 and np.all(d[5] == 0.0)
  assert np.isfinite(out[6]) and np.all(d[6, [0, 3]] == 0.0)
  np.testing.assert_allclose(out, ref.nll_loss(lp, y, **kw), rtol=1e-6)
  np.testing.assert_allclose(d, ref.nll_loss_vjp(lp, y, np.ones(7), **kw),
                             rtol=1e-6)


def test_nll_all_ignored_and_bad_labels():
  val, d = jax.value_and_grad(js.nll_loss)(
      jnp.asarray(LP), jnp.full((N,), IGNORE), ignore_index=IGNORE)
  assert val == 0.0 and np.all(d == 0.0)
  y = np.array(Y)
  y[0] = C
  out = jax.jit(lambda lp, y: js.nll_loss(lp, y, reduction="none"))(LP, y)
  assert np.isnan(out[0]) and np.all(np.isfinite(out[1:]))


# --------------------------------------------------------------------------
# properties


ELEMENTS = st.one_of(
    st.floats(-10, 10, width=32),
    st.sampled_from([1e30, -1e30, -np.inf]),
)


@st.composite
def loss_case(draw):
  nb = draw(st.integers(0, 2))
  batch = tuple(draw(st.lists(st.integers(1, 3), min_size=nb, max_size=nb)))
  ncls = draw(st.integers(1, 4))
  class_pos = draw(st.integers(0, nb))
  shape = batch[:class_pos] + (ncls,) + batch[class_pos:]
  axis = class_pos if draw(st.booleans()) else class_pos - len(shape)
  z = draw(hnp.arrays(np.float32, shape, elements=ELEMENTS))
  kind = draw(st.sampled_from(["int", "prob"]))
  ignore = draw(st.sampled_from([None, -1]))
  if kind == "int":
    lo = -1 if ignore is not None else 0
    labels = draw(hnp.arrays(np.int32, batch,
                             elements=st.integers(lo, ncls - 1)))
  else:
    raw = draw(hnp.arrays(np.float32, shape, elements=st.floats(0, 1)))
    labels = raw / np.maximum(np.sum(raw, axis=axis, keepdims=True), 1e-3)
    # No subnormal target mass: XLA on CPU flushes it to 0.
    labels = np.where(labels < 1e-30, 0.0, labels).astype(np.float32)
  where_kind = draw(st.sampled_from(["none", "class", "row", "empty"]))
  where = None
  if where_kind == "class":
    where = draw(hnp.arrays(np.bool_, shape))
  elif where_kind == "row":
    where = draw(hnp.arrays(np.bool_, batch))
  elif where_kind == "empty":
    where = np.zeros(shape, bool)
  opts = {}
  if draw(st.booleans()):
    opts["label_smoothing"] = draw(st.sampled_from([0.1, 0.5]))
  if draw(st.booleans()):
    opts["class_weights"] = draw(hnp.arrays(
        np.float32, (ncls,), elements=st.sampled_from([0.5, 1.0, 2.0])))
  if draw(st.booleans()):
    opts["soft_cap"] = draw(st.sampled_from([1.0, 30.0]))
  reduction = draw(st.sampled_from(REDUCTIONS))
  return z, labels, axis, where, ignore, opts, reduction


@given(loss_case())
def test_property_cross_entropy_matches_reference(case):
  z, labels, axis, where, ignore, opts, reduction = case
  kw = dict(opts, axis=axis, where=where, ignore_index=ignore,
            reduction=reduction)
  expected = ref.cross_entropy(z, labels, **kw)
  g = np.ones(np.shape(expected), np.float32)
  kind = "int" if labels.dtype == np.int32 else "prob"
  out, dz, dt = lib_vjp(js.cross_entropy, jnp.asarray(z), jnp.asarray(labels),
                        jnp.asarray(g), kind, jit=True, **kw)
  edz, edt = ref.cross_entropy_vjp(z, labels, g, **kw)
  assert_scaled_close(out, expected, 1e-5)
  assert_scaled_close(dz, edz, 1e-5)
  if kind == "prob":
    assert_scaled_close(dt, edt, 1e-5)
  # No NaN appears from finite, -inf or masked inputs.
  assert not np.any(np.isnan(np.asarray(dz)))
