"""A sharded language-model head on 8 simulated CPU devices.

    python scripts/sharded_example.py

The vocabulary projection ``w`` (d, V) is split over the mesh axis "model"
and the batch over "data" (a 2 x 4 mesh). Inside ``jax.shard_map`` each
device holds ``w[:, V/4 slice]`` and ``x[B/2 slice]``;
``linear_cross_entropy(..., axis_name="model", batch_axis_name="data")``
returns the loss over the whole vocabulary and the global batch, with a few
per-row collectives and no all-gather. The script checks the result
against one device.
"""

import os

os.environ.setdefault("XLA_FLAGS",
                      "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_softmax as js  # noqa: E402


def main() -> None:
  batch, d, vocab = 64, 32, 1024
  k = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k[0], (batch, d))
  w = 0.1 * jax.random.normal(k[1], (d, vocab))
  y = jax.random.randint(k[2], (batch,), 0, vocab)
  mesh = jax.make_mesh((2, 4), ("data", "model"),
                       axis_types=(AxisType.Auto, AxisType.Auto))

  def head_loss(x, w, y):
    loss, aux = js.linear_cross_entropy(
        x, w, y, axis_name="model", batch_axis_name="data",
        label_smoothing=0.1, z_loss=1e-4, return_aux=True)
    accuracy = jax.lax.pmean(jnp.mean(aux.correct), "data")
    return loss, accuracy

  sharded = jax.shard_map(
      head_loss, mesh=mesh,
      in_specs=(P("data"), P(None, "model"), P("data")),
      out_specs=(P(), P()))
  step = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1), has_aux=True))
  (loss, accuracy), (dx, dw) = step(x, w, y)

  def one_device(x, w):
    return js.linear_cross_entropy(x, w, y, label_smoothing=0.1, z_loss=1e-4)

  want, (dx1, dw1) = jax.value_and_grad(one_device, (0, 1))(x, w)
  print(f"devices: {jax.device_count()}  mesh: {dict(mesh.shape)}")
  print(f"loss {float(loss):.6f} (one device {float(want):.6f}), "
        f"accuracy {float(accuracy):.3f}")
  print(f"max |dw - dw_1dev| = {float(jnp.max(jnp.abs(dw - dw1))):.2e}, "
        f"max |dx - dx_1dev| = {float(jnp.max(jnp.abs(dx - dx1))):.2e}")
  assert jnp.allclose(loss, want, rtol=1e-5)
  assert jnp.allclose(dw, dw1, atol=1e-6) and jnp.allclose(dx, dx1, atol=1e-6)


if __name__ == "__main__":
  main()
