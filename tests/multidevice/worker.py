"""One process of the 2-process test in tests/test_sharded.py.

Usage: python worker.py PROCESS_ID PORT OUT_DIR. Two processes with 2
simulated CPU devices each join through JAX's own distributed runtime
(loopback coordinator, gloo collectives), shard the batch over all 4
global devices, load only their own rows, and save their results.
"""

import os
import sys

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_softmax as js

B, D, V = 16, 8, 40


def data():
  k = jax.random.split(jax.random.key(0), 3)
  x = np.asarray(jax.random.normal(k[0], (B, D)))
  w = np.asarray(jax.random.normal(k[1], (D, V)))
  y = np.asarray(jax.random.randint(k[2], (B,), 0, V))
  return x, w, y


def loss_fn(x, w, y):
  return js.linear_cross_entropy(x, w, y, chunk_size=2, label_smoothing=0.1)


def main(pid: int, port: str, out_dir: str) -> None:
  # Before the backend starts: 2 devices here, gloo for cross-process ops.
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=2, process_id=pid)
  x, w, y = data()
  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(AxisType.Explicit,))
  rows = NamedSharding(mesh, P("data"))
  lo, hi = pid * B // 2, (pid + 1) * B // 2
  xg = jax.make_array_from_process_local_data(rows, x[lo:hi], (B, D))
  yg = jax.make_array_from_process_local_data(rows, y[lo:hi], (B,))
  wg = jax.make_array_from_process_local_data(NamedSharding(mesh, P()), w,
                                              (D, V))
  with jax.set_mesh(mesh):
    loss, (dx, dw) = jax.jit(jax.value_and_grad(loss_fn, (0, 1)))(xg, wg, yg)
  shards = sorted(dx.addressable_shards, key=lambda s: s.index[0].start)
  np.savez(os.path.join(out_dir, f"proc{pid}.npz"),
           loss=np.asarray(loss.addressable_data(0)),
           dw=np.asarray(dw.addressable_data(0)),
           dx=np.concatenate([np.asarray(s.data) for s in shards]),
           lo=lo, hi=hi, devices=jax.device_count())


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
