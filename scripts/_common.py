"""What ``train.py`` and ``train_lm.py`` share: argparse types, the
multi-process flags and their ``jax.distributed`` start, and host <-> mesh
helpers. The scripts import it from their own directory, as ``rundir``::

    from _common import POSITIVE_INT, init_distributed, strong, to_host
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np


# ----------------------------------------------------------------- flags
def checked(kind, ok, what):
  """An argparse type: kind(text), rejected unless ok(value)."""
  def parse(text):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(
          f"expected {kind.__name__}, got {text!r}") from None
    if not ok(value):
      raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return value
  return parse


POSITIVE_INT = checked(int, lambda v: v > 0, "> 0")
NON_NEGATIVE_INT = checked(int, lambda v: v >= 0, ">= 0")
POSITIVE_FLOAT = checked(float, lambda v: 0 < v < math.inf, "> 0, finite")
NON_NEGATIVE_FLOAT = checked(float, lambda v: 0 <= v < math.inf,
                             ">= 0, finite")


def add_multiprocess_args(parser: argparse.ArgumentParser) -> None:
  """The flags that ``init_distributed`` reads, in their own group."""
  multi = parser.add_argument_group(
      "multi-process (one process per host, jax.distributed)")
  multi.add_argument(
      "--coordinator-address", default=None, metavar="HOST:PORT",
      help="process 0's address; with --num-processes and --process-id "
      "this process joins a multi-process run (jax.distributed.initialize)")
  multi.add_argument(
      "--num-processes", type=POSITIVE_INT, default=None,
      help="number of processes in the run")
  multi.add_argument(
      "--process-id", type=NON_NEGATIVE_INT, default=None,
      help="this process's index in [0, --num-processes)")
  multi.add_argument(
      "--distributed", action="store_true",
      help="call jax.distributed.initialize() with the cluster settings "
      "JAX detects itself (SLURM, TPU pods, Open MPI, ...)")


def init_distributed(args, parser) -> None:
  """Joins a multi-process run when asked to (before any device is used).

  On CPU the processes' collectives go through gloo.
  """
  manual = (args.coordinator_address, args.num_processes, args.process_id)
  if all(v is None for v in manual) and not args.distributed:
    return
  if not args.distributed and any(v is None for v in manual):
    parser.error("--coordinator-address, --num-processes and --process-id "
                 "go together")
  if (args.process_id is not None and args.num_processes is not None
      and args.process_id >= args.num_processes):
    parser.error(f"--process-id {args.process_id} is not below "
                 f"--num-processes {args.num_processes}")
  before = jax.config.jax_cpu_collectives_implementation
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(*manual)
  except ValueError as e:  # settings missing and no cluster detected
    jax.config.update("jax_cpu_collectives_implementation", before)
    parser.error(f"jax.distributed.initialize: {e}")


# --------------------------------------------------------- host <-> mesh
def local_rows(sharding, shape) -> slice:
  """The rows (first axis) of a global array of ``shape`` sharded by
  ``sharding`` that this process's devices hold, as one span."""
  spans = [index[0] for index in
           sharding.addressable_devices_indices_map(shape).values()]
  lo = min(span.start or 0 for span in spans)
  hi = max(shape[0] if span.stop is None else span.stop for span in spans)
  return slice(lo, hi)


def to_host(a):
  """A NumPy copy of a (replicated) array, also across processes."""
  return np.asarray(a.addressable_data(0) if isinstance(a, jax.Array)
                    else a)


def strong(tree):
  """Drops weak types, so fresh, stepped and restored states share one
  compiled step (optax inits some scalars weakly typed)."""
  return jax.tree.map(lambda x: jnp.asarray(x, x.dtype), tree)
