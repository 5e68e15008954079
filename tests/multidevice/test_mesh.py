"""Mesh tests on 8 simulated CPU devices.

Run by tests/test_sharded.py in a subprocess that sets
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before jax is
imported; skipped when collected in a process with fewer devices.
"""

import contextlib
import functools
import re
from collections import Counter

import chex
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_softmax as js

pytestmark = pytest.mark.skipif(jax.device_count() < 8,
                                reason="needs 8 (simulated) devices")

B, D, V = 32, 8, 64
MASKED = 7  # the vocabulary slot masked by a -inf bias ("masked_vocab")


def _data():
  k = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(k[0], (B, D))
  w = jax.random.normal(k[1], (D, V))
  bias = jax.random.normal(k[2], (V,))
  y = jax.random.randint(k[3], (B,), 0, V).at[3].set(-100)
  return x, w, bias, y


# Each option of linear_cross_entropy alone, then all together. "where"
# has False rows in every shard of the batch, and all of rows 8-11 (one
# device's rows in the data-parallel mesh) False.
_ROWS = jnp.arange(B)
OPTIONS = {
    "plain": {},
    "ignore_index": {"ignore_index": -100},
    "where": {"where": (_ROWS % 5 != 2) & (_ROWS // 4 != 2)},
    "label_smoothing": {"label_smoothing": 0.1},
    "class_weights": {"class_weights": jnp.linspace(0.5, 2.0, V)},
    "z_loss": {"z_loss": 1e-3},
    "soft_cap": {"soft_cap": 5.0},
    "masked_vocab": {},  # bias[MASKED] = -inf, see _case
    "grad_in_forward": {"grad_in_forward": False},
    "padded_chunks": {"chunk_size": 3},  # divides no local batch (32, 16, 4)
    "all": {"ignore_index": -100, "label_smoothing": 0.1,
            "class_weights": jnp.linspace(0.5, 2.0, V), "z_loss": 1e-3,
            "soft_cap": 5.0},
}
REDUCTIONS = ["mean", "sum", "none"]
COT = jnp.linspace(-1.0, 1.0, B)  # cotangent of the per-row losses


def _collectives(compiled):
  return Counter(re.findall(
      r" (all-gather|all-reduce|all-to-all|collective-permute|"
      r"reduce-scatter)[\(-]", compiled.as_text()))


def _mesh(shape, names, axis_type=AxisType.Auto):
  return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names))


def _case(option):
  """``(x, w, bias, labels, where)`` and the other options of one case."""
  x, w, bias, y = _data()
  opts = dict(OPTIONS[option])
  if "ignore_index" not in opts:
    y = y.at[3].set(0)
  if option == "masked_vocab":
    bias = bias.at[MASKED].set(-jnp.inf)
    y = jnp.where(y == MASKED, MASKED + 1, y)
  return (x, w, bias, y, opts.pop("where", None)), opts


def _scalar(loss, reduction, argnums=(0, 1, 2)):
  """What is differentiated: the loss, or ``sum(out * COT)`` for "none"
  (by default w.r.t. x, w and bias)."""
  def f(*args):
    out = loss(*args)
    return jnp.sum(out * COT) if reduction == "none" else out
  return jax.value_and_grad(f, argnums)


@functools.cache
def _one_device(option, reduction):
  """Value and gradients (x, w, bias) of the same call on one device."""
  args, opts = _case(option)

  def loss(x, w, bias, y, where):
    return js.linear_cross_entropy(x, w, y, bias=bias, where=where,
                                   reduction=reduction, **opts)

  want = jax.jit(_scalar(loss, reduction))(*args)
  assert all(jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(want))
  return want


def _check(vg, args, want, mesh=None, gather_free=True):
  """Compiles ``vg`` once (under ``mesh`` if given), checks its output on
  ``args`` against ``want`` and (if ``gather_free``) that it has no
  all-gather; returns the compiled HLO's collectives."""
  with contextlib.ExitStack() as stack:
    if mesh is not None:
      stack.enter_context(jax.set_mesh(mesh))
    compiled = jax.jit(vg).lower(*args).compile()
    got = compiled(*args)
  chex.assert_trees_all_close(got, want, rtol=2e-5, atol=1e-6)
  ops = _collectives(compiled)
  assert ops["all-gather"] == 0 or not gather_free, ops
  return ops


def _check_case(option, reduction, loss, args, mesh=None, gather_free=True):
  """:func:`_check` of ``loss``'s value and gradients against one
  device."""
  return _check(_scalar(loss, reduction), args,
                _one_device(option, reduction), mesh, gather_free)


MATRIX = pytest.mark.parametrize(
    ("option", "reduction"),
    [(o, r) for o in OPTIONS for r in REDUCTIONS])


@MATRIX
def test_vocab_parallel_1d(option, reduction):
  args, opts = _case(option)
  opts.setdefault("chunk_size", 8)
  mesh = _mesh((8,), ("model",))

  def local(x, w, bias, y, where):
    return js.linear_cross_entropy(x, w, y, bias=bias, where=where,
                                   reduction=reduction, axis_name="model",
                                   **opts)

  loss = jax.shard_map(
      local, mesh=mesh,
      in_specs=(P(), P(None, "model"), P("model"), P(), P()),
      out_specs=P())
  ops = _check_case(option, reduction, loss, args)
  assert ops["all-to-all"] == 0 and ops["all-reduce"] > 0, ops


@MATRIX
def test_2d_mesh_batch_axis_name(option, reduction):
  args, opts = _case(option)
  opts.setdefault("chunk_size", 4)
  mesh = _mesh((2, 4), ("data", "model"))

  def local(x, w, bias, y, where):
    return js.linear_cross_entropy(x, w, y, bias=bias, where=where,
                                   reduction=reduction, axis_name="model",
                                   batch_axis_name="data", **opts)

  loss = jax.shard_map(
      local, mesh=mesh,
      in_specs=(P("data"), P(None, "model"), P("model"), P("data"),
                P("data")),
      out_specs=P("data") if reduction == "none" else P())
  _check_case(option, reduction, loss, args)


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
@MATRIX
def test_data_parallel_under_jit(option, reduction, axis_type):
  """No shard_map: the batch is placed over the mesh and the loss jitted.
  Explicit axes are visible at trace time (the loss runs its chunk loop
  per shard); Auto axes are not, and the strided row chunks keep each
  chunk split like the batch (a chunk size a multiple of the 8 shards)."""
  (x, w, bias, y, where), opts = _case(option)
  opts.setdefault("chunk_size", 2 if axis_type == AxisType.Explicit else 8)
  mesh = _mesh((8,), ("data",), axis_type)
  rows, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  args = (jax.device_put(x, rows), jax.device_put(w, rep),
          jax.device_put(bias, rep), jax.device_put(y, rows),
          None if where is None else jax.device_put(where, rows))

  def loss(x, w, bias, y, where):
    return js.linear_cross_entropy(x, w, y, bias=bias, where=where,
                                   reduction=reduction, **opts)

  # Under Auto axes a batch that the chunk does not divide is padded, which
  # re-blocks it over the devices: still exact, but gathered (documented).
  padded = axis_type == AxisType.Auto and option == "padded_chunks"
  _check_case(option, reduction, loss, args, mesh, gather_free=not padded)


def test_2d_mesh_caller_psums_sum():
  x, w, bias, y = _data()
  mesh = _mesh((2, 4), ("data", "model"))

  def local(x, w, bias, y):
    loss = js.linear_cross_entropy(x, w, y, bias=bias, reduction="sum",
                                   axis_name="model", ignore_index=-100)
    return jax.lax.psum(loss, "data")

  sharded = jax.shard_map(
      local, mesh=mesh,
      in_specs=(P("data"), P(None, "model"), P("model"), P("data")),
      out_specs=P())
  got = jax.jit(jax.value_and_grad(sharded, (0, 1, 2)))(x, w, bias, y)
  chex.assert_trees_all_close(got, _one_device("ignore_index", "sum"),
                              rtol=2e-5, atol=1e-6)


def test_vocab_parallel_aux_is_global():
  x, w, bias, y = _data()
  mesh = _mesh((8,), ("model",))

  def local(x, w, bias):
    loss, aux = js.linear_cross_entropy(
        x, w, y, bias=bias, axis_name="model", ignore_index=-100,
        return_aux=True)
    return loss - 0.1 * jnp.mean(aux.entropy), aux

  sharded = jax.shard_map(local, mesh=mesh,
                          in_specs=(P(), P(None, "model"), P("model")),
                          out_specs=(P(), P()))

  def one(x, w, bias):
    loss, aux = js.cross_entropy(x @ w + bias[None, :], y, ignore_index=-100,
                                 return_aux=True)
    return loss - 0.1 * jnp.mean(aux.entropy), aux

  got = jax.jit(jax.value_and_grad(sharded, (0, 1, 2), has_aux=True))(
      x, w, bias)
  want = jax.value_and_grad(one, (0, 1, 2), has_aux=True)(x, w, bias)
  chex.assert_trees_all_close(got, want, rtol=2e-5, atol=1e-6)


def test_data_parallel_explicit_axes_cross_entropy():
  x, w, _, y = _data()
  mesh = _mesh((8,), ("data",), AxisType.Explicit)
  rows = NamedSharding(mesh, P("data"))
  xs, ys = jax.device_put(x, rows), jax.device_put(y, rows)
  ws = jax.device_put(w, NamedSharding(mesh, P()))

  def loss(x, w, y):
    return js.cross_entropy(x @ w, y, ignore_index=-100)

  with jax.set_mesh(mesh):
    vg = jax.jit(jax.value_and_grad(loss, (0, 1)))
    got = vg(xs, ws, ys)
    ops = _collectives(vg.lower(xs, ws, ys).compile())
  want = jax.value_and_grad(loss, (0, 1))(x, w, y)
  chex.assert_trees_all_close(got, want, rtol=2e-5, atol=1e-6)
  assert ops["all-gather"] == 0


def test_data_parallel_auto_axes_cross_entropy():
  x, w, _, y = _data()
  mesh = _mesh((8,), ("data",))
  rows = NamedSharding(mesh, P("data"))
  z, ys = jax.device_put(x @ w, rows), jax.device_put(y, rows)
  vg = jax.jit(jax.value_and_grad(
      lambda z, y: js.cross_entropy(z, y, ignore_index=-100)))
  chex.assert_trees_all_close(
      vg(z, ys), jax.value_and_grad(
          lambda z: js.cross_entropy(z, y, ignore_index=-100))(x @ w),
      rtol=2e-5, atol=1e-6)
  assert _collectives(vg.lower(z, ys).compile())["all-gather"] == 0


HYPER = {"label_smoothing": jnp.float32(0.1), "z_loss": jnp.float32(1e-3),
         "soft_cap": jnp.float32(5.0),
         "class_weights": jnp.linspace(0.5, 2.0, V)}


def _hyper_grads(loss, reduction, mesh=None, place=lambda a: a):
  """Checks value and gradients w.r.t. (x, w, bias, hyperparameters) of
  ``loss(x, w, bias, y, hp)`` against one device."""
  x, w, bias, y = _data()

  def one(x, w, bias, y, hp):
    return js.linear_cross_entropy(x, w, y, bias=bias, reduction=reduction,
                                   ignore_index=-100, **hp)

  argnums = (0, 1, 2, 4)
  want = _scalar(one, reduction, argnums)(x, w, bias, y, HYPER)
  assert all(jnp.any(g != 0) for g in jax.tree.leaves(want[1][3]))
  _check(_scalar(loss, reduction, argnums), place((x, w, bias, y, HYPER)),
         want, mesh)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("two_d", [False, True], ids=["1d", "2d"])
def test_hyperparameter_gradients_vocab_parallel(reduction, two_d):
  """Gradients w.r.t. smoothing, z-loss, soft-cap and class weights over
  the global vocabulary (and the global batch on the 2-D mesh)."""
  rows = P("data") if two_d else P()
  mesh = (_mesh((2, 4), ("data", "model")) if two_d
          else _mesh((8,), ("model",)))

  def local(x, w, bias, y, hp):
    return js.linear_cross_entropy(
        x, w, y, bias=bias, reduction=reduction, ignore_index=-100,
        axis_name="model", batch_axis_name="data" if two_d else None,
        chunk_size=4, **hp)

  hp_specs = {k: P() for k in HYPER}
  per_row = rows if reduction == "none" else P()
  _hyper_grads(jax.shard_map(
      local, mesh=mesh,
      in_specs=(rows, P(None, "model"), P("model"), rows, hp_specs),
      out_specs=per_row), reduction)


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_hyperparameter_gradients_data_parallel_under_jit(reduction,
                                                           axis_type):
  mesh = _mesh((8,), ("data",), axis_type)
  rows, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())

  def place(args):
    x, w, bias, y, hp = args
    return (jax.device_put(x, rows), jax.device_put(w, rep),
            jax.device_put(bias, rep), jax.device_put(y, rows),
            jax.device_put(hp, rep))

  def loss(x, w, bias, y, hp):
    return js.linear_cross_entropy(x, w, y, bias=bias, reduction=reduction,
                                   ignore_index=-100, chunk_size=8, **hp)

  _hyper_grads(loss, reduction, mesh, place)


def test_vocab_parallel_tied_embedding_layout():
  """``w_layout="vd"``: a (V, d) embedding split on its first axis."""
  x, w, bias, y = _data()
  opts = OPTIONS["all"]
  emb = jnp.asarray(w.T)
  mesh = _mesh((2, 4), ("data", "model"))

  def local(x, emb, bias, y):
    return js.linear_cross_entropy(x, emb, y, bias=bias, w_layout="vd",
                                   axis_name="model", batch_axis_name="data",
                                   chunk_size=4, **opts)

  loss = jax.shard_map(
      local, mesh=mesh,
      in_specs=(P("data"), P("model", None), P("model"), P("data")),
      out_specs=P())
  vg = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))
  value, (dx, demb, dbias) = vg(x, emb, bias, y)
  want = _one_device("all", "mean")
  chex.assert_trees_all_close((value, (dx, demb.T, dbias)), want,
                              rtol=2e-5, atol=1e-6)
  assert _collectives(vg.lower(x, emb, bias, y).compile())["all-gather"] == 0


def test_check_vma_false_values_exact_gradients_refused():
  x, w, bias, y = _data()
  mesh = _mesh((2, 4), ("data", "model"))

  def local(x, w, bias, y):
    return js.linear_cross_entropy(x, w, y, bias=bias, ignore_index=-100,
                                   axis_name="model", batch_axis_name="data")

  loss = jax.shard_map(
      local, mesh=mesh, check_vma=False,
      in_specs=(P("data"), P(None, "model"), P("model"), P("data")),
      out_specs=P())
  chex.assert_trees_all_close(jax.jit(loss)(x, w, bias, y),
                              _one_device("ignore_index", "mean")[0],
                              rtol=2e-5)
  with pytest.raises(ValueError, match="check_vma=True"):
    jax.jit(jax.grad(loss, 1))(x, w, bias, y)


def test_unsplit_inputs_for_named_axes_are_errors():
  x, w, bias, y = _data()
  mesh = _mesh((2, 4), ("data", "model"))

  def run(w_spec, row_spec):
    def local(x, w, y):
      return js.linear_cross_entropy(x, w, y, ignore_index=-100,
                                     axis_name="model",
                                     batch_axis_name="data")
    return jax.jit(jax.shard_map(
        local, mesh=mesh, in_specs=(row_spec, w_spec, row_spec),
        out_specs=P()))(x, w, y)

  with pytest.raises(ValueError, match="w must be split on V"):
    run(P(), P("data"))
  with pytest.raises(ValueError, match="w must be split on V"):
    run(P(), P())  # nothing split at all: still typed, still an error
  with pytest.raises(ValueError, match="must be split on the batch"):
    run(P(None, "model"), P())


# Post-training: linear_log_prob_objective and weighted cross-entropy.


def _objective(logp, entropy, old_logp, adv):
  return -adv * jnp.exp(logp - old_logp) - 0.01 * entropy


# (mesh, reduction, chunk_size, temperature differentiated). Per-row
# weights and objective arguments once made the loss vary over the
# vocabulary axis (they were cast to it): out_specs P() was refused.
POST = [
    ("1d", "mean", 8, False), ("2d", "mean", 4, False),
    ("2d", "sum", 3, True), ("2d", "none", 4, False),
    ("1d", "none", 3, True), ("data", "mean", 2, False),
    ("data", "sum", 3, True), ("data", "none", 2, False)]


@pytest.mark.parametrize("kind", ["objective", "weights"])
@pytest.mark.parametrize(("mesh", "reduction", "chunk", "grad_t"), POST)
def test_post_training_vocab_and_batch_parallel(kind, mesh, reduction,
                                                 chunk, grad_t):
  """Values and gradients (x, w, bias, fn_args or weights, temperature)
  inside shard_map equal one device's."""
  x, w, bias, y = _data()
  where = (_ROWS % 5 != 2) & (_ROWS // 4 != 2)
  k = jax.random.split(jax.random.key(1), 2)
  per_row = (-3.0 + jax.random.normal(k[0], (B,)),
             jax.random.normal(k[1], (B,)))
  if kind == "weights":
    per_row = jnp.linspace(-1.0, 2.0, B)  # negative weights included

  def loss(x, w, bias, y, where, per_row, t, axis_name=None,
           batch_axis_name=None):
    opts = dict(bias=bias, where=where, reduction=reduction,
                chunk_size=chunk, temperature=t, axis_name=axis_name,
                batch_axis_name=batch_axis_name)
    if kind == "weights":
      return js.linear_cross_entropy(x, w, y, weights=per_row,
                                     label_smoothing=0.1, z_loss=1e-3, **opts)
    return js.linear_log_prob_objective(x, w, y, _objective, per_row, **opts)

  rows = P() if mesh == "1d" else P("data")
  vocab = P() if mesh == "data" else P("model")
  local = functools.partial(
      loss, axis_name=None if mesh == "data" else "model",
      batch_axis_name=None if mesh == "1d" else "data")
  sharded = jax.shard_map(
      local, mesh={"1d": _mesh((8,), ("model",)),
                   "2d": _mesh((2, 4), ("data", "model")),
                   "data": _mesh((8,), ("data",))}[mesh],
      in_specs=(rows, P(None, *vocab), vocab, rows, rows,
                jax.tree.map(lambda _: rows, per_row), P()),
      out_specs=rows if reduction == "none" else P())
  argnums = (0, 1, 2, 5, 6) if grad_t else (0, 1, 2, 5)
  args = (x, w, bias, y, where, per_row, jnp.float32(0.8))
  want = jax.jit(_scalar(loss, reduction, argnums))(*args)
  assert all(jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(want))
  assert all(jnp.any(g != 0) for g in jax.tree.leaves(want[1]))
  _check(_scalar(sharded, reduction, argnums), args, want)


# The fourth review (2026-12-04).


def test_vocab_parallel_nan_rows_and_argmax_match_one_device():
  """XLA:CPU's pmax skips NaN: a row of NaN logits on every shard came out
  -inf and was dropped (loss 0, left out of the mean), and the argmax of
  a NaN row was another class (or V itself)."""
  x, w, bias, y = _data()
  x = x.at[2, 0].set(jnp.nan)                 # row 2: every logit NaN
  w = w.at[:, 13].set(jnp.where(_ROWS[:D] < 4, w[:, 13], jnp.nan))
  y = y.at[3].set(0)
  mesh = _mesh((8,), ("model",))

  def loss(x, w, axis_name=None, reduction="none"):
    return js.linear_cross_entropy(x, w, y, axis_name=axis_name,
                                   reduction=reduction, return_aux=True)

  for reduction in REDUCTIONS:
    sharded = jax.shard_map(
        functools.partial(loss, axis_name="model", reduction=reduction),
        mesh=mesh, in_specs=(P(), P(None, "model")), out_specs=P())
    got = jax.jit(sharded)(x, w)
    want = loss(x, w, reduction=reduction)
    # Every row's logit 13 is NaN (a NaN column on shard 1), and row 2's
    # every logit: the argmax is the first NaN, 13 (row 2: 0).
    assert list(want[1].argmax) == [13, 13, 0] + [13] * (B - 3)
    chex.assert_trees_all_close(got, want, rtol=2e-5, atol=1e-6)
  clean = x.at[2, 0].set(1.0)
  w_row = w.at[:, 13].set(0.0)
  w_row = w_row.at[0, 40:48].set(jnp.nan)     # shard 5: NaN where x[:, 0]
  got = jax.jit(jax.shard_map(
      functools.partial(loss, axis_name="model"), mesh=mesh,
      in_specs=(P(), P(None, "model")), out_specs=P()))(clean, w_row)
  want = loss(clean, w_row)
  assert list(want[1].argmax) == [40] * B
  chex.assert_trees_all_close(got, want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("vocab", [True, False], ids=["vocab", "no_vocab"])
@pytest.mark.parametrize("check_vma", [True, False])
def test_batch_split_over_a_tuple_of_axes(check_vma, vocab):
  """batch_axis_name=("a", "b"): values and gradients as one device; with
  check_vma=False the gradients are refused, as for one axis name (without
  axis_name they were silently 4x too small)."""
  x, w, bias, y = _data()
  mesh = _mesh((2, 2, 2), ("a", "b", "model"))
  rows = P(("a", "b"))
  cols = P("model") if vocab else P()

  def loss(x, w, bias, y, **names):
    return js.linear_cross_entropy(x, w, y, bias=bias, ignore_index=-100,
                                   **names)

  sharded = jax.shard_map(
      functools.partial(loss, axis_name="model" if vocab else None,
                        batch_axis_name=("a", "b")),
      mesh=mesh, check_vma=check_vma,
      in_specs=(rows, P(None, *cols), cols, rows), out_specs=P())
  want = jax.value_and_grad(loss, (0, 1, 2))(x, w, bias, y)
  if not check_vma:
    chex.assert_trees_all_close(jax.jit(sharded)(x, w, bias, y), want[0],
                                rtol=2e-5)
    with pytest.raises(ValueError, match="check_vma=True"):
      jax.jit(jax.grad(sharded, 1))(x, w, bias, y)
    return
  got = jax.jit(jax.value_and_grad(sharded, (0, 1, 2)))(x, w, bias, y)
  chex.assert_trees_all_close(got, want, rtol=2e-5, atol=1e-6)
  with pytest.raises(ValueError, match="must be split on the batch"):
    jax.jit(jax.shard_map(
        functools.partial(loss, batch_axis_name=("a", "b")), mesh=mesh,
        in_specs=(P("a"), P(), P(), P("a")), out_specs=P()))(x, w, bias, y)


# Explicit mesh axes, no shard_map: layouts other than "x split over the
# batch, everything else replicated" crashed inside the library (a gather
# or a dot whose output sharding JAX could not infer); now w, bias and the
# hyperparameters are replicated and the per-row inputs follow x's rows.
EXPLICIT_LAYOUTS = {  # x, w, class_weights, weights, labels
    "w_split_on_v": (P("data"), P(None, "model"), P(), P("data"),
                     P("data")),
    "x_replicated_weights_split": (P(), P(), P(), P("data"), P()),
    "x_replicated_labels_split": (P(), P(), P(), P(), P("data")),
    "class_weights_split": (P("data"), P(), P("model"), P(), P()),
    "x_split_on_d": (P(None, "model"), P("model", None), P(), P(), P()),
    "all_split": (P("data"), P(None, "model"), P("model"), P("data"),
                  P("data")),
}


@pytest.mark.parametrize("layout", EXPLICIT_LAYOUTS)
def test_fused_loss_on_explicit_axes_any_layout(layout):
  x, w, bias, y = _data()
  cw, weights = jnp.linspace(0.5, 2.0, V), jnp.linspace(-1.0, 2.0, B)

  def loss(x, w, cw, weights, y):
    return js.linear_cross_entropy(x, w, y, bias=bias, class_weights=cw,
                                   weights=weights, label_smoothing=0.1,
                                   ignore_index=-100)

  vg = jax.value_and_grad(loss, (0, 1, 2, 3))
  want = vg(x, w, cw, weights, y)
  mesh = _mesh((2, 4), ("data", "model"), AxisType.Explicit)
  with jax.set_mesh(mesh):
    args = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(
        (x, w, cw, weights, y), EXPLICIT_LAYOUTS[layout], strict=True)]
    got = jax.jit(vg)(*args)
  chex.assert_trees_all_close(got, want, rtol=2e-5, atol=1e-6)
  for g, a in zip(got[1], args[:4], strict=True):   # in its input's layout
    assert g.sharding.is_equivalent_to(a.sharding, g.ndim)


@pytest.mark.parametrize("spec", [P("data", "model"), P(None, "model")])
def test_cross_entropy_of_vocab_split_logits_on_explicit_axes(spec):
  x, w, _, y = _data()
  z = x @ w
  mesh = _mesh((2, 4), ("data", "model"), AxisType.Explicit)

  def loss(z, y):
    ce, aux = js.cross_entropy(z, y, ignore_index=-100, return_aux=True)
    nll = js.nll_loss(js.log_softmax(z), y, ignore_index=-100)
    return ce + nll + jnp.mean(aux.entropy)

  want = jax.value_and_grad(loss)(z, y)
  with jax.set_mesh(mesh):
    zs = jax.device_put(z, NamedSharding(mesh, spec))
    ys = jax.device_put(y, NamedSharding(mesh, P(spec[0])))
    got = jax.jit(jax.value_and_grad(loss))(zs, ys)
  chex.assert_trees_all_close(got, want, rtol=2e-5, atol=1e-6)
  assert got[1].sharding.is_equivalent_to(zs.sharding, 2)


# (logits, class_weights, weights, labels) on Explicit axes.
EXPLICIT_LOGIT_LAYOUTS = [
    (P("data", "model"), P(), P("data"), P("data")),
    (P(None, "model"), P("model"), P(), P()),
    (P(), P(), P("data"), P("data")),
    (P("data"), P("model"), P(), P()),
]


@pytest.mark.parametrize("layout", EXPLICIT_LOGIT_LAYOUTS, ids=str)
def test_every_loss_on_explicit_axes_any_layout(layout):
  """Values and gradients (logits, class weights, weights, temperature)
  of every function on logits and hyperparameters split any way: the
  gathers, the class-weight scatter and the cotangents' shardings were
  left to JAX, which could not infer them."""
  x, w, _, y = _data()
  z = x @ w
  cw, weights = jnp.linspace(0.5, 2.0, V), jnp.linspace(-1.0, 2.0, B)

  def loss(z, cw, weights, t, y):
    ce = js.cross_entropy(z, y, class_weights=cw, weights=weights,
                          label_smoothing=0.1, z_loss=1e-3, soft_cap=5.0,
                          temperature=t)
    ce_aux, aux = js.cross_entropy(z, y, class_weights=cw, temperature=t,
                                   return_aux=True)
    nll = js.nll_loss(js.log_softmax(z / t), y, class_weights=cw,
                      weights=weights)
    obj = js.log_prob_objective(z, y, lambda lp, h, a: -a * lp - 0.1 * h,
                                (weights,), temperature=t)
    drop_in = jnp.mean(js.softmax_cross_entropy_with_integer_labels(
        z, jnp.maximum(y, 0)))
    prob = js.cross_entropy(z, js.softmax(z * 0.5), class_weights=cw,
                            label_smoothing=0.1)
    prims = (jnp.mean(js.logsumexp(z, axis=-1, b=cw))
             + jnp.mean(js.softmax(z) * cw[None, :])
             + jnp.mean(js.log_softmax(z, where=z > 0) * cw[None, :]))
    return (ce + ce_aux + jnp.mean(aux.entropy) + jnp.mean(aux.lse) + nll
            + obj + drop_in + prob + prims)

  vg = jax.value_and_grad(loss, (0, 1, 2, 3))
  want = vg(z, cw, weights, jnp.float32(0.8), y)
  mesh = _mesh((2, 4), ("data", "model"), AxisType.Explicit)
  with jax.set_mesh(mesh):
    args = [jax.device_put(a, NamedSharding(mesh, s))
            for a, s in zip((z, cw, weights, y), layout, strict=True)]
    got = jax.jit(vg)(*args[:3], jnp.float32(0.8), args[3])
  chex.assert_trees_all_close(got, want, rtol=2e-5, atol=1e-6)
  for g, a in zip(got[1][:3], args[:3], strict=True):
    assert g.sharding.is_equivalent_to(a.sharding, g.ndim)


# (batch, seq) layouts of (batch, seq, V) logits and (batch, seq, d)
# activations on Explicit axes.
SEQUENCE_LAYOUTS = [P("data", "model"), P(None, "model"), P("model", None),
                    P(None, ("model", "data"))]


@pytest.mark.parametrize("rows", SEQUENCE_LAYOUTS, ids=str)
def test_sequence_split_on_explicit_axes(rows):
  """3-D logits, labels, masks, weights and fn_args split over the batch
  and/or the sequence: flattening a (batch, seq@model) array and
  unflattening the per-row results raised ShardingTypeError (JAX infers a
  merged dimension's sharding only where every dimension is split)."""
  bt, seq = 8, 8
  k = jax.random.split(jax.random.key(1), 5)
  x = jax.random.normal(k[0], (bt, seq, D))
  w = jax.random.normal(k[1], (D, V))
  y = jax.random.randint(k[2], (bt, seq), 0, V).at[1, 2].set(-100)
  mask = jax.random.bernoulli(k[3], 0.8, (bt, seq, V)).at[..., 0].set(True)
  adv = jax.random.normal(k[4], (bt, seq))
  cot = jnp.linspace(-1.0, 1.0, bt * seq).reshape(bt, seq)

  def loss(z, x, adv, y, mask):
    total = 0.0
    for red in ("mean", "none"):
      def r(v, red=red):
        return jnp.sum(cot * v) if red == "none" else v
      ce, aux = js.cross_entropy(z, y, where=mask, weights=adv,
                                 label_smoothing=0.1, return_aux=True,
                                 reduction=red)
      total += (r(ce) + jnp.mean(aux.entropy * cot)
                + r(js.nll_loss(js.log_softmax(z), y, reduction=red))
                + r(js.log_prob_objective(
                    z, y, lambda lp, h, a: -a * lp - 0.1 * h, (adv,),
                    reduction=red))
                + r(js.cross_entropy(jnp.swapaxes(z, 1, 2),
                                     js.softmax(jnp.swapaxes(z, 1, 2), axis=1),
                                     axis=1, reduction=red))
                + r(js.linear_cross_entropy(x, w, y, weights=adv,
                                            reduction=red)))
    return total

  vg = jax.value_and_grad(loss, (0, 1, 2))
  want = vg(x @ w, x, adv, y, mask)
  mesh = _mesh((2, 4), ("data", "model"), AxisType.Explicit)
  with jax.set_mesh(mesh):
    def put(a, spec):
      return jax.device_put(a, NamedSharding(mesh, spec))
    args = (put(x @ w, P(*rows, None)), put(x, P(*rows, None)),
            put(adv, rows), put(y, rows), put(mask, P(*rows, None)))
    got = jax.jit(vg)(*args)
  chex.assert_trees_all_close(got, want, rtol=2e-5, atol=1e-5)
  for g, a in zip(got[1], args[:3], strict=True):   # in its input's layout
    assert g.sharding.is_equivalent_to(a.sharding, g.ndim)


@pytest.mark.parametrize("rows", [P(None, "data", "model"),
                                  P("data", None, "model")], ids=str)
def test_vmap_of_sequence_split_logits_on_explicit_axes(rows):
  # vmap over a leading axis of (e, batch, seq, V) logits split on
  # Explicit axes: the flattening and unflattening reshapes take the
  # vmapped dimension's sharding too.
  k = jax.random.split(jax.random.key(2), 2)
  z = jax.random.normal(k[0], (2, 4, 8, V))
  y = jax.random.randint(k[1], (2, 4, 8), 0, V)

  def loss(z, y):
    ce, aux = js.cross_entropy(z, y, reduction="none", return_aux=True)
    return jnp.sum(ce * aux.entropy) + js.cross_entropy(z, y)

  vg = jax.vmap(jax.value_and_grad(loss))
  want = vg(z, y)
  mesh = _mesh((2, 4), ("data", "model"), AxisType.Explicit)
  with jax.set_mesh(mesh):
    zs = jax.device_put(z, NamedSharding(mesh, P(*rows, None)))
    ys = jax.device_put(y, NamedSharding(mesh, rows))
    got = jax.jit(vg)(zs, ys)
  chex.assert_trees_all_close(got, want, rtol=2e-5, atol=1e-6)
  assert got[1].sharding.is_equivalent_to(zs.sharding, 4)


@pytest.mark.parametrize(("logits", "rows"), [
    (P("data", None), P(None, "model")), (P("data", "model"), P("model")),
    (P(), P("data", "model")), (P(None, None, "model"), P("data"))], ids=str)
def test_per_row_inputs_split_otherwise_than_the_logits(logits, rows):
  # Labels, row and full masks, weights, probability labels and fn_args
  # split otherwise than the (batch, seq, V) logits met them in an
  # elementwise op that JAX refused (incompatible shardings); they are
  # resharded to the logits' rows, and per-row results follow the logits.
  k = jax.random.split(jax.random.key(3), 5)
  z = jax.random.normal(k[0], (8, 8, V))
  y = jax.random.randint(k[1], (8, 8), 0, V).at[0, 1].set(-100)
  keep = jax.random.bernoulli(k[2], 0.9, (8, 8))
  mask = jax.random.bernoulli(k[3], 0.8, (8, 8, V)).at[..., 0].set(True)
  adv = jax.random.normal(k[4], (8, 8))
  cot = jnp.linspace(-1.0, 1.0, 64).reshape(8, 8)

  def loss(z, adv, y, keep, mask, probs):
    return (jnp.sum(cot * js.cross_entropy(z, y, where=keep, weights=adv,
                                           reduction="none"))
            + js.cross_entropy(z, y, where=mask)
            + js.cross_entropy(z, probs, where=mask)
            + js.nll_loss(js.log_softmax(z), y, weights=adv)
            + js.log_prob_objective(z, y, lambda lp, h, a: -a * lp - h,
                                    (adv,), where=keep))

  probs = js.softmax(0.5 * z)
  vg = jax.value_and_grad(loss, (0, 1))
  want = vg(z, adv, y, keep, mask, probs)
  mesh = _mesh((2, 4), ("data", "model"), AxisType.Explicit)
  full = P(*rows, None)
  with jax.set_mesh(mesh):
    def put(a, spec):
      return jax.device_put(a, NamedSharding(mesh, spec))
    zs = put(z, logits)
    got = jax.jit(vg)(zs, put(adv, rows), put(y, rows), put(keep, rows),
                      put(mask, full), put(probs, full))
    per_row = jax.jit(lambda z, y: js.cross_entropy(z, y, reduction="none"))(
        zs, put(y, rows))
  chex.assert_trees_all_close(got, want, rtol=2e-5, atol=1e-5)
  assert got[1][0].sharding.is_equivalent_to(zs.sharding, 3)
  batch = tuple(zs.sharding.spec) + (None,) * 3
  assert per_row.sharding.is_equivalent_to(
      NamedSharding(mesh, P(*batch[:2])), 2)
