"""The fused loss's chunk loop: its configuration, the chunk size, and
the one ``lax.scan`` over row chunks (in groups for the ``dw`` product)
that both sweeps of :mod:`jax_softmax._fused` run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple, cast

import jax
import jax.numpy as jnp
from jax import lax

from jax_softmax import _matmuls, _reduce, _sharded
from jax_softmax._kernel import Hyper
from jax_softmax._numerics import MatmulPolicy, compute_dtype

#: Bytes of chunk temporaries aimed at when ``chunk_size`` is None: a chunk
#: holds about three float32 ``(c, V)`` arrays (logits, exp, gradient).
CHUNK_BUDGET_BYTES = 128 * 2**20

#: Fewest rows per chunk when ``chunk_size`` is None: each chunk adds its
#: ``x_c^T g`` into the float32 ``dw`` (a read and a write of ``d * V``
#: floats), which dominates for small chunks (the benchmark's
#: ``--section fused`` measures it).
MIN_CHUNK_ROWS = 256


def default_chunk_size(num_rows: int, vocab: int) -> int:
  """Rows per chunk so that ``3 * 4 * c * V <= CHUNK_BUDGET_BYTES``.

  At least :data:`MIN_CHUNK_ROWS` (the budget yields to it for very large
  vocabularies), a multiple of 8, at most ``num_rows``; if a divisor of
  ``num_rows`` lies within a factor 2 below that, it is taken instead so no
  padding is needed, a multiple of 8 first (so that a batch split over 2,
  4 or 8 devices stays split inside every chunk).
  """
  c = max(MIN_CHUNK_ROWS, CHUNK_BUDGET_BYTES // (12 * max(vocab, 1)))
  c -= c % 8
  if c >= num_rows:
    return max(num_rows, 1)
  for step in (8, 1):
    for cand in range(c, c // 2, -step):
      if num_rows % cand == 0:
        return cand
  return c


class Config(NamedTuple):
  """The static configuration of one fused-loss call."""

  reduction: str
  chunk: int
  grad_in_forward: bool | None
  policy: MatmulPolicy
  return_aux: bool = False
  vocab_axis: str | None = None     # mesh axis splitting the vocabulary
  batch_axes: _sharded.BatchAxes = None   # mesh axes splitting the batch
  varying: tuple[str, ...] = ()     # shard_map axes the inputs vary over
  vocab_major: bool = False         # w given as (V, d)
  untyped_mesh: bool = False        # in shard_map with check_vma=False
  objective: Callable | None = None  # fn(log_p, entropy, *fn_args) per row


class Need(NamedTuple):
  """Which gradients a sweep forms (the inputs that are perturbed)."""

  dx: bool = False
  dw: bool = False
  dbias: bool = False
  hyper: bool = False
  rows: bool = False     # per-row weights or objective arguments


class Grads(NamedTuple):
  """Gradients of a sweep, float32, None where not formed; ``scale``
  multiplies ``dx``, ``dw`` and ``dbias`` (see ``_reduce.recount``)."""

  dx: jax.Array | None = None
  dw: jax.Array | None = None
  dbias: jax.Array | None = None
  hyper: Hyper | None = None
  scale: jax.Array | None = None
  rows: _reduce.PerRow | None = None   # d weights, d fn_args (per row)
  # A chunk's dz in the operands' dtype and its row mask (or None), for
  # the dw product of its group of chunks (see chunk_scan).
  dz: tuple[jax.Array, jax.Array | None] | None = None


def row_chunks(a, chunk):
  """``(n, ...) -> (n / chunk, chunk, ...)``, chunk ``j`` holding rows
  ``j, j + n / chunk, ...`` (strided): a batch split in blocks over
  devices then stays split inside every chunk (no all-gather)."""
  return jnp.swapaxes(a.reshape((chunk, -1) + a.shape[1:]), 0, 1)


def flat_chunks(a):
  return jnp.swapaxes(a, 0, 1).reshape((-1,) + a.shape[2:])


def add_grad(acc, upd):
  return acc if upd is None else acc + upd


def group_size(chunks: int, chunk: int, d: int, itemsize: int) -> int:
  """Chunks per ``dw`` product: all of them when the whole batch's rounded
  ``dz`` takes no more room than the float32 ``(d, V)`` accumulator it
  replaces (``dw`` is then one product, added into nothing: less memory,
  and no read and write of the accumulator per chunk, a gigabyte each at
  d = 1024, V = 128000); else one (a product per chunk)."""
  return max(chunks, 1) if chunks * chunk * itemsize <= 4 * d else 1


def chunk_scan(cfg: Config, step, x, ws: _matmuls.Weights, per_row,
               need: Need, forms_dz: bool, forms_hyper: bool, hp: Hyper):
  """The fused loss's single loop: ``step(carry, chunk)`` over the row
  chunks of ``x`` and the per-row pytree ``per_row``, the carry being the
  ``dw``/``dbias``/hyperparameter accumulators (zeros where formed).
  ``step`` gets ``(x_c, per_row_c)`` and returns ``(carry, (outputs,
  dz))``, ``dz`` its :attr:`Grads.dz`. The chunks run in groups (an
  inner loop, see :func:`group_size`); ``dw`` adds one product per group,
  ``x_g^T dz_g``: a plain one with a ``(d, rows)`` copy of ``x`` when the
  policy wants it (``plain_dw``; then ``dw`` accumulates as ``(d, V)``
  and a ``(V, d)`` ``w``'s is transposed once at the end). Returns the
  summed accumulators (hyperparameter gradients also summed over the
  devices holding other rows) and the flattened per-chunk outputs."""
  dtype = compute_dtype(x.dtype)
  # Mesh axes the rows vary over (the vocabulary axis is summed inside
  # grad_hyper).
  row_axes = tuple(a for a in cfg.varying if a != cfg.vocab_axis)

  def zeros(shape, dt, axes=cfg.varying):
    return _sharded.varying_zeros(shape, dt, axes)

  forms_dw = forms_dz and need.dw
  plain_dw = forms_dw and cfg.policy.plain_dw
  given = ws.vd if cfg.vocab_major else ws.dv
  assert given is not None
  d, vocab = given.shape[::-1] if cfg.vocab_major else given.shape
  dw_shape = (d, vocab) if plain_dw or not cfg.vocab_major else (vocab, d)
  init = Grads(
      dw=zeros(dw_shape, dtype) if forms_dw else None,
      dbias=zeros(vocab, dtype) if forms_dz and need.dbias else None,
      hyper=jax.tree.map(lambda a: zeros(a.shape, a.dtype, row_axes), hp)
      if forms_hyper and need.hyper else None)
  xs = jax.tree.map(lambda a: row_chunks(a, cfg.chunk), (x, per_row))
  n = xs[0].shape[0]
  g = group_size(n, cfg.chunk, d, given.dtype.itemsize) if forms_dw else 1
  # g > 1: an inner loop over each group's chunks; g = 1: none (a loop of
  # one trip would change XLA's fusion of the step).
  groups, inner = xs, step
  if g > 1:
    groups = jax.tree.map(lambda a: a.reshape((n // g, g) + a.shape[1:]), xs)
    inner = functools.partial(lax.scan, step)

  def merge(a):  # a group's stacked chunks as rows
    return a.reshape((-1,) + a.shape[2:]) if g > 1 else a

  xt = None
  if plain_dw:   # one (d, rows) copy of x per sweep, per group
    xt = jnp.swapaxes(groups[0].reshape((n // g, g * cfg.chunk, d)), 1,
                      2).astype(given.dtype)

  def body(acc, inp):
    chunks, xt_g = inp
    acc, (ys, dz) = inner(acc, chunks)
    if forms_dw:
      dz_g, keep = jax.tree.map(merge, dz)
      rows = xt_g if plain_dw else merge(chunks[0]).astype(given.dtype)
      acc = acc._replace(dw=acc.dw + _matmuls.grad_dw(
          rows, dz_g, keep, plain=plain_dw, vocab_major=cfg.vocab_major))
    return acc, ys

  acc, ys = lax.scan(body, init, (groups, xt))
  if plain_dw and cfg.vocab_major:
    # The barrier keeps XLA from folding the transpose into the product of
    # a one-trip loop (a dot of two transposed bfloat16 operands, which
    # the CPU backend cannot run).
    dw = lax.optimization_barrier(cast(jax.Array, acc.dw))
    acc = acc._replace(dw=jnp.swapaxes(dw, 0, 1))
  acc = acc._replace(hyper=_sharded.sum_over(acc.hyper, row_axes))
  return acc, jax.tree.map(lambda a: flat_chunks(merge(a)), ys)


def accumulate(acc: Grads, g: Grads) -> Grads:
  return Grads(None, add_grad(acc.dw, g.dw), add_grad(acc.dbias, g.dbias),
               None if acc.hyper is None else jax.tree.map(
                   add_grad, acc.hyper, g.hyper))
