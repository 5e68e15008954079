"""Mesh tests on 8 simulated CPU devices.

Run by tests/test_sharded.py in a subprocess that sets
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before jax is
imported; skipped when collected in a process with fewer devices.
"""

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


def _data():
  k = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(k[0], (B, D))
  w = jax.random.normal(k[1], (D, V))
  bias = jax.random.normal(k[2], (V,))
  y = jax.random.randint(k[3], (B,), 0, V).at[3].set(-100)
  return x, w, bias, y


OPTIONS = {
    "plain": {},
    "all": {"ignore_index": -100, "label_smoothing": 0.1,
            "class_weights": jnp.linspace(0.5, 2.0, V), "z_loss": 1e-3,
            "soft_cap": 5.0},
}


def _collectives(compiled):
  return Counter(re.findall(
      r" (all-gather|all-reduce|all-to-all|collective-permute|"
      r"reduce-scatter)[\(-]", compiled.as_text()))


def _mesh(shape, names, axis_type=AxisType.Auto):
  return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names))


def _one_device(x, w, bias, y, reduction, opts, cot=None):
  def f(x, w, bias):
    out = js.linear_cross_entropy(x, w, y, bias=bias, reduction=reduction,
                                  **opts)
    return jnp.sum(out * cot) if cot is not None else out
  return jax.value_and_grad(f, (0, 1, 2))(x, w, bias)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_vocab_parallel_1d(reduction, option):
  x, w, bias, y = _data()
  opts = OPTIONS[option] | {"ignore_index": -100}
  mesh = _mesh((8,), ("model",))
  cot = jnp.linspace(-1.0, 1.0, B) if reduction == "none" else None
  specs = P() if reduction != "none" else P()

  def local(x, w, bias):
    return js.linear_cross_entropy(x, w, y, bias=bias, reduction=reduction,
                                   axis_name="model", chunk_size=8, **opts)

  sharded = jax.shard_map(local, mesh=mesh,
                          in_specs=(P(), P(None, "model"), P("model")),
                          out_specs=specs)

  def f(x, w, bias):
    out = sharded(x, w, bias)
    return jnp.sum(out * cot) if cot is not None else out

  vg = jax.jit(jax.value_and_grad(f, (0, 1, 2)))
  chex.assert_trees_all_close(vg(x, w, bias),
                              _one_device(x, w, bias, y, reduction, opts, cot),
                              rtol=2e-5, atol=1e-6)
  ops = _collectives(vg.lower(x, w, bias).compile())
  assert ops["all-gather"] == 0 and ops["all-to-all"] == 0
  assert ops["all-reduce"] > 0


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_2d_mesh_batch_axis_name(reduction):
  x, w, bias, y = _data()
  opts = OPTIONS["all"]
  mesh = _mesh((2, 4), ("data", "model"))

  def local(x, w, bias, y):
    return js.linear_cross_entropy(x, w, y, bias=bias, reduction=reduction,
                                   axis_name="model", batch_axis_name="data",
                                   chunk_size=4, **opts)

  sharded = jax.shard_map(
      local, mesh=mesh,
      in_specs=(P("data"), P(None, "model"), P("model"), P("data")),
      out_specs=P())
  vg = jax.jit(jax.value_and_grad(sharded, (0, 1, 2)))
  chex.assert_trees_all_close(vg(x, w, bias, y),
                              _one_device(x, w, bias, y, reduction, opts),
                              rtol=2e-5, atol=1e-6)
  assert _collectives(vg.lower(x, w, bias, y).compile())["all-gather"] == 0


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
  chex.assert_trees_all_close(
      got, _one_device(x, w, bias, y, "sum", {"ignore_index": -100}),
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


@pytest.mark.parametrize("fn", ["cross_entropy", "linear_cross_entropy"])
def test_data_parallel_explicit_axes(fn):
  x, w, _, y = _data()
  mesh = _mesh((8,), ("data",), AxisType.Explicit)
  rows = NamedSharding(mesh, P("data"))
  xs, ys = jax.device_put(x, rows), jax.device_put(y, rows)
  ws = jax.device_put(w, NamedSharding(mesh, P()))

  def loss(x, w, y):
    if fn == "cross_entropy":
      return js.cross_entropy(x @ w, y, ignore_index=-100)
    return js.linear_cross_entropy(x, w, y, ignore_index=-100, chunk_size=2)

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
