"""Fused linear cross-entropy: the loss of ``x @ w`` without the logits.

Rows are processed in chunks of ``c`` rows (``lax.scan``); a chunk's logits
``(c, V)`` live only inside one step. Chunks are strided (chunk ``j`` holds
rows ``j, j + n / c, ...``), so a batch split in blocks over devices by
``Auto`` mesh axes stays split inside every chunk. Two gradient strategies:

* **gradient in the forward pass** (scalar reductions): the per-row
  cotangents of a unit output cotangent are known before the loop (the
  mean's denominators depend only on the row mask, the labels and the
  bias), so each step of :func:`_forward_sweep` also forms
  ``g = d loss / d z`` and does ``dx_c = g w^T``, ``dw += x_c^T g``
  (float32 accumulator). Residuals are those gradients, in float32; the
  backward pass scales them by the output cotangent and rounds each to its
  input's dtype once. Three matmuls in all, the minimum.
* **recompute in the backward pass** (``reduction="none"``,
  ``grad_in_forward=False``, differentiated hyperparameters, aux
  cotangents): residuals are the inputs and the per-row statistics;
  :func:`_backward_sweep` recomputes each chunk's logits (four matmuls)
  and honours any per-row cotangent.

Inputs that are not differentiated are seen in the forward pass
(``symbolic_zeros=True``) and their gradient matmul is skipped. The row
math is :mod:`jax_softmax._kernel`'s; the matmul layout follows
:func:`jax_softmax._numerics.matmul_policy`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple, cast

import jax
import jax.numpy as jnp
from jax import lax

from jax_softmax import _matmuls, _reduce, _sharded
from jax_softmax._aux import (
  LossAux,
  grad_aux,
  grad_stats_entropy,
  row_aux,
  stats_entropy,
)
from jax_softmax._kernel import (
  Classes,
  Hyper,
  RowCotangents,
  RowStats,
  grad_hyper,
  grad_logits,
  label_weights,
  row_stats,
  temperature_grad,
)
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


class _Need(NamedTuple):
  """Which gradients a sweep forms (the inputs that are perturbed)."""

  dx: bool = False
  dw: bool = False
  dbias: bool = False
  hyper: bool = False
  rows: bool = False     # per-row weights or objective arguments


class _Grads(NamedTuple):
  """Gradients of a sweep, float32, None where not formed; ``scale``
  multiplies ``dx``, ``dw`` and ``dbias`` (see ``_reduce.recount``)."""

  dx: jax.Array | None = None
  dw: jax.Array | None = None
  dbias: jax.Array | None = None
  hyper: Hyper | None = None
  scale: jax.Array | None = None
  rows: _reduce.PerRow | None = None   # d weights, d fn_args (per row)
  # A chunk's dz in the operands' dtype and its row mask (or None), for
  # the dw product of its group of chunks (see _scan).
  dz: tuple[jax.Array, jax.Array | None] | None = None


def _vocab(cfg: Config, w) -> int:
  """This device's vocabulary size (``V`` of ``w``'s layout)."""
  return w.shape[0] if cfg.vocab_major else w.shape[1]


def _classes(cfg: Config, w) -> Classes:
  return _sharded.classes_of(_vocab(cfg, w), cfg.vocab_axis)


def _chunk_grads(cfg: Config, classes, z, chunk, hp: Hyper, st: RowStats,
                 aux, cot, aux_cot, need: _Need) -> _Grads:
  """One chunk's gradients: ``dz`` from the loss's per-row cotangents
  ``cot`` (or None) and the aux's ``(g_lse, g_entropy)``, then ``dx``;
  ``dz`` itself is returned (rounded) for ``dw``. ``chunk`` is
  ``(ws, y_c)``."""
  ws, y_c = chunk
  g_lse, g_ent = aux_cot
  dz = jnp.zeros(z.shape, z.dtype)
  if cot is not None:
    dz = dz + grad_logits(z, y_c, None, hp, st, cot, int_labels=True,
                          classes=classes)
  objective = cfg.objective is not None
  if objective and g_ent is not None:   # aux: the rows' entropy
    dz = dz + grad_stats_entropy(z, st, aux, g_ent, hp)
  elif g_lse is not None or g_ent is not None:
    dz = dz + grad_aux(z, None, hp, aux, g_lse, g_ent, classes=classes)
  # Aux terms reach every row; the loss and an objective only counted ones.
  keep = st.counted if objective or (g_lse is None and g_ent is None) else None
  # Rounded once, before both of its products (as on GPU and TPU).
  dz_w = dz.astype(ws.dtype)
  dx = _matmuls.grad_dx(dz_w, ws) if need.dx else None
  dh = None
  if need.hyper and cot is not None:
    dh = grad_hyper(z, y_c, None, hp, st, cot, int_labels=True,
                    classes=classes)
    dh = dh._replace(temperature=temperature_grad(dz, z, hp, classes))
  return _Grads(dx, None, jnp.sum(dz, axis=0) if need.dbias else None, dh,
                dz=(dz_w, keep) if need.dw else None)


def _chunks(a, chunk):
  """``(n, ...) -> (n / chunk, chunk, ...)``, chunk ``j`` holding rows
  ``j, j + n / chunk, ...`` (strided): a batch split in blocks over
  devices then stays split inside every chunk (no all-gather)."""
  return jnp.swapaxes(a.reshape((chunk, -1) + a.shape[1:]), 0, 1)


def _flat(a):
  return jnp.swapaxes(a, 0, 1).reshape((-1,) + a.shape[2:])


def _add(acc, upd):
  return acc if upd is None else acc + upd


def _group(chunks: int, chunk: int, d: int, itemsize: int) -> int:
  """Chunks per ``dw`` product: all of them when the whole batch's rounded
  ``dz`` takes no more room than the float32 ``(d, V)`` accumulator it
  replaces (``dw`` is then one product, added into nothing: less memory,
  and no read and write of the accumulator per chunk, a gigabyte each at
  d = 1024, V = 128000); else one (a product per chunk)."""
  return max(chunks, 1) if chunks * chunk * itemsize <= 4 * d else 1


def _scan(cfg: Config, step, x, ws: _matmuls.Weights, per_row, need: _Need,
          forms_dz: bool, forms_hyper: bool, hp: Hyper):
  """The single loop of this module: ``step(carry, chunk)`` over the row
  chunks of ``x`` and the per-row pytree ``per_row``, the carry being the
  ``dw``/``dbias``/hyperparameter accumulators (zeros where formed).
  ``step`` gets ``(x_c, per_row_c)`` and returns ``(carry, (outputs,
  dz))``, ``dz`` its :attr:`_Grads.dz`. The chunks run in groups (an
  inner loop, see :func:`_group`); ``dw`` adds one product per group,
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
  init = _Grads(
      dw=zeros(dw_shape, dtype) if forms_dw else None,
      dbias=zeros(vocab, dtype) if forms_dz and need.dbias else None,
      hyper=jax.tree.map(lambda a: zeros(a.shape, a.dtype, row_axes), hp)
      if forms_hyper and need.hyper else None)
  xs = jax.tree.map(lambda a: _chunks(a, cfg.chunk), (x, per_row))
  n = xs[0].shape[0]
  g = _group(n, cfg.chunk, d, given.dtype.itemsize) if forms_dw else 1
  # g > 1: an inner loop over each group's chunks; g = 1: none (a loop of
  # one trip would change XLA's fusion of the step).
  groups, inner = xs, step
  if g > 1:
    groups = jax.tree.map(lambda a: a.reshape((n // g, g) + a.shape[1:]), xs)
    inner = functools.partial(lax.scan, step)

  def merge(a):  # a group's stacked chunks as rows
    return a.reshape((-1,) + a.shape[2:]) if g > 1 else a
  rows = None
  if forms_dw:   # one copy of x per sweep: (groups, g * chunk, d)
    rows = groups[0].reshape((n // g, g * cfg.chunk, d)).astype(given.dtype)
    if plain_dw:
      rows = jnp.swapaxes(rows, 1, 2)

  def body(acc, inp):
    chunks, rows_g = inp
    acc, (ys, dz) = inner(acc, chunks)
    if rows_g is not None:
      dz_g, keep = jax.tree.map(merge, dz)
      acc = acc._replace(dw=acc.dw + _matmuls.grad_dw(
          rows_g, dz_g, keep, plain=plain_dw, vocab_major=cfg.vocab_major))
    return acc, ys

  acc, ys = lax.scan(body, init, (groups, rows))
  if plain_dw and cfg.vocab_major:
    acc = acc._replace(dw=jnp.swapaxes(cast(jax.Array, acc.dw), 0, 1))
  acc = acc._replace(hyper=_sharded.sum_over(acc.hyper, row_axes))
  return acc, jax.tree.map(lambda a: _flat(merge(a)), ys)


def _accumulate(acc: _Grads, g: _Grads) -> _Grads:
  return _Grads(None, _add(acc.dw, g.dw), _add(acc.dbias, g.dbias),
                None if acc.hyper is None else jax.tree.map(
                    _add, acc.hyper, g.hyper))


def _stats(cfg: Config, classes, z, y_c, r_c, hp: Hyper, keep_exp: bool):
  """The chunk's row stats and aux: the :class:`LossAux` with
  ``return_aux``, the rows' entropy (from the stats) for an objective."""
  objective = cfg.objective is not None
  st = row_stats(z, y_c, r_c, None, hp, int_labels=True, classes=classes,
                 keep_exp=keep_exp or objective)
  aux = None
  if objective:
    aux = stats_entropy(z, st, hp, classes)
  elif cfg.return_aux:
    aux = row_aux(z, y_c, st.counted, None, hp, int_labels=True,
                  classes=classes)
  return st, aux


def _forward_sweep(cfg: Config, x, w, bias, y, row, hp: Hyper,
                   rows: _reduce.PerRow, need: _Need | None = None,
                   cot: RowCotangents | None = None):
  """Statistics (and aux, and the objective's per-row values) of every
  row; with the per-row cotangents ``cot`` of a unit output cotangent, also
  the gradients in ``need`` (those of the objective's arguments included).
  Returns ``(stats, aux, objective values, grads)``."""
  need = need or _Need()
  classes = _classes(cfg, w)
  ws = _matmuls.operands(w, cfg.policy, cfg.vocab_major)
  row_cot = None if cot is None else (cot.xent, cot.z_loss, cot.scale)

  def step(acc, inp):
    x_c, (y_c, r_c, cot_c, rows_c) = inp
    x_c = x_c.astype(ws.dtype)
    z = _matmuls.logits(x_c, ws, bias)
    # exp(z - m) is kept for this step's dz only (never a scan output).
    st, aux = _stats(cfg, classes, z, y_c, r_c, hp, keep_exp=cot is not None)
    f = dx = d_args = dz = None
    if cfg.objective is not None:
      f = _reduce.objective_rows(cfg.objective, st, aux,
                                 rows_c.fn_args)
    if cot_c is not None:
      c, g_ent = RowCotangents(cot_c[0], cot_c[1], cot.mean_xent,
                               cot_c[2]), None
      if cfg.objective is not None:   # d fn / d (log p, entropy, args)
        c, g_ent, d_args = _reduce.objective_cotangents(
            cfg.objective, st, aux, rows_c.fn_args, cot_c[2])
      g = _chunk_grads(cfg, classes, z, (ws, y_c), hp, st, aux, c,
                       (None, g_ent), need)
      acc, dx, dz = _accumulate(acc, g), g.dx, g.dz
    return acc, ((st._replace(exp=None), aux, f, dx, d_args), dz)

  acc, (st, aux, f, dx, d_args) = _scan(
      cfg, step, x, ws, (y, row, row_cot, rows), need, cot is not None,
      False, hp)
  if cot is None:
    return st, aux, f, None
  d_weights = _reduce.weight_grad(st, cot, rows.weights)
  return st, aux, f, acc._replace(dx=dx, rows=_reduce.PerRow(
      d_weights, () if d_args is None else d_args))


def _backward_sweep(cfg: Config, x, w, bias, y, hp: Hyper, need: _Need,
                    st: RowStats, aux, cot: RowCotangents | None, aux_cot):
  """The gradients in ``need`` for per-row cotangents ``cot`` (or None)
  and aux cotangents ``(g_lse, g_entropy)``, recomputing each chunk's
  logits from ``x`` and ``w``."""
  classes = _classes(cfg, w)
  ws = _matmuls.operands(w, cfg.policy, cfg.vocab_major)
  row_cot = None if cot is None else (cot.xent, cot.z_loss, cot.scale)

  def step(acc, inp):
    x_c, (y_c, st_c, aux_c, cot_c, g_lse, g_ent) = inp
    x_c = x_c.astype(ws.dtype)
    z = _matmuls.logits(x_c, ws, bias)
    c = None if cot_c is None else RowCotangents(cot_c[0], cot_c[1],
                                                 cot.mean_xent, cot_c[2])
    g = _chunk_grads(cfg, classes, z, (ws, y_c), hp, st_c, aux_c, c,
                     (g_lse, g_ent), need)
    return _accumulate(acc, g), (g.dx, g.dz)

  acc, dx = _scan(cfg, step, x, ws, (y, st, aux, row_cot, *aux_cot), need,
                  True, cot is not None, hp)
  return acc._replace(dx=dx)


def _outputs(cfg: Config, st, aux, f, hp, rows: _reduce.PerRow):
  if cfg.objective is not None:
    return _reduce.reduce_objective(f, st, cfg.reduction, cfg.batch_axes)
  loss = _reduce.reduce_rows(st, hp, cfg.reduction, cfg.batch_axes,
                             rows.weights)
  return (loss, aux) if cfg.return_aux else loss


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(cfg: Config, x, w, bias, y, row, hp, rows):
  st, aux, f, _ = _forward_sweep(cfg, x, w, bias, y, row, hp, rows)
  return _outputs(cfg, st, aux, f, hp, rows)


class _Residuals(NamedTuple):
  """What the backward pass keeps: the inputs (no copies) and row stats,
  and the loss's gradients when they were formed in the forward pass."""

  grads: _Grads | None
  features: jax.Array
  weights: jax.Array
  bias: jax.Array | None
  labels: jax.Array
  hp: Hyper
  stats: RowStats
  aux: LossAux | jax.Array | None   # see _stats
  need: _Need
  rows: _reduce.PerRow


def _unit_cotangents(cfg: Config, w, bias, y, row, hp, weights
                     ) -> tuple[RowStats, RowCotangents]:
  """Per-row cotangents of a unit output cotangent, before the loop, and
  the row stats they assume: a row counts iff it is unmasked and the bias
  leaves it a class (right unless infinite ``x`` or ``w`` drive a row's
  every logit to ``-inf``: see ``_reduce.recount``)."""
  classes = _classes(cfg, w)
  counted = row
  if bias is not None:
    has_class = (bias[None, :] != -jnp.inf).astype(jnp.int32)
    counted = row & (classes.max(has_class)[0] > 0)
  w_y = label_weights(y, hp, classes.num_classes, compute_dtype(w.dtype))
  pre = _reduce.stats_of(jnp.zeros_like(w_y), counted,
                         jnp.where(counted, w_y, 0.0))
  return pre, _reduce.row_cotangents(pre, cfg.reduction, 1.0,
                                     int_labels=True,
                                     batch_axes=cfg.batch_axes,
                                     weights=weights)


def _fused_fwd(cfg: Config, x, w, bias, y, row, hp, rows):
  (x, dx_on), (w, dw_on), (bias, db_on), (y, _), (row, _), (hp, hp_on), (
      rows, rows_on) = (_reduce.unwrap_primals(a) for a in (
          x, w, bias, y, row, hp, rows))
  need = _Need(dx_on, dw_on, db_on, hp_on, rows_on)
  if cfg.untyped_mesh and any(need):
    raise ValueError(
        "gradients of linear_cross_entropy with axis_name/batch_axis_name "
        "need jax.shard_map(..., check_vma=True) (the default): with "
        "check_vma=False the partial gradients of each device would not be "
        "summed.")
  in_forward = (cfg.reduction != "none" and not hp_on
                and cfg.grad_in_forward is not False)
  pre, cot = (_unit_cotangents(cfg, w, bias, y, row, hp, rows.weights)
              if in_forward else (None, None))
  st, aux, f, grads = _forward_sweep(cfg, x, w, bias, y, row, hp, rows, need,
                                     cot)
  if grads is not None and pre is not None:
    grads = grads._replace(scale=_reduce.recount(pre, st, hp, cfg.reduction,
                                                 cfg.batch_axes))
  return _outputs(cfg, st, aux, f, hp, rows), _Residuals(
      grads=grads, features=x, weights=w, bias=bias, labels=y, hp=hp,
      stats=st, aux=aux, need=need, rows=rows)


def _recompute_cotangents(cfg: Config, res: _Residuals, g, aux_cot):
  """Per-row and aux cotangents of the output cotangent ``g``, and the
  per-row inputs' gradients, for the backward sweep."""
  st = res.stats
  cot = _reduce.row_cotangents(st, cfg.reduction, g, int_labels=True,
                               batch_axes=cfg.batch_axes,
                               weights=res.rows.weights)
  if cfg.objective is None:
    return cot, aux_cot, _reduce.PerRow(
        _reduce.weight_grad(st, cot, res.rows.weights), ())
  assert res.aux is not None
  cot, g_ent, d_args = _reduce.objective_cotangents(
      cfg.objective, st, res.aux, res.rows.fn_args, cot.scale)
  return cot, (None, g_ent), _reduce.PerRow(None, d_args)


def _fused_bwd(cfg: Config, res: _Residuals, g):
  g, aux_cot = _reduce.split_cotangent(g, cfg.return_aux)
  cot, d_rows = None, _reduce.PerRow(None, ())
  if res.grads is None:
    cot, aux_cot, d_rows = _recompute_cotangents(cfg, res, g, aux_cot)
  out = _Grads()
  if cot is not None or aux_cot != (None, None):
    out = _backward_sweep(cfg, res.features, res.weights, res.bias,
                          res.labels, res.hp, res.need, res.stats, res.aux,
                          cot, aux_cot)
  if res.grads is not None:  # the loss's share, formed in the forward pass
    g = g if res.grads.scale is None else g * res.grads.scale
    out = out._replace(**{
        k: _add(g * a, getattr(out, k)) for k, a in zip(
            ("dx", "dw", "dbias"), res.grads[:3], strict=True)
        if a is not None})
    d_rows = jax.tree.map(lambda a: g * a, res.grads.rows)
  # float32 until here: each gradient is rounded to its input's dtype once.
  dx, dw, db = (a if a is None or p is None else a.astype(p.dtype)
                for a, p in zip(out[:3], (res.features, res.weights,
                                          res.bias), strict=True))
  weights = res.rows.weights
  d_rows = _reduce.PerRow(
      None if d_rows.weights is None or weights is None
      else d_rows.weights.astype(weights.dtype),
      tuple(d.astype(a.dtype) for d, a in zip(
          d_rows.fn_args, res.rows.fn_args, strict=True)))
  return dx, dw, db, None, None, out.hyper, d_rows


_fused.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)
# Compiled once per configuration and shapes (eager calls stay fast).
_fused_jit = jax.jit(_fused, static_argnums=0)


def local_loss(cfg: Config, x, w, bias, labels, row, hp,
               rows: _reduce.PerRow):
  """The fused loss over this device's rows (all rows off a mesh);
  ``rows`` holds per-row arrays of the batch shape."""
  batch_shape = x.shape[:-1]
  n = math.prod(batch_shape)
  x2, y2, row2 = (x.reshape(n, x.shape[-1]), labels.reshape(n),
                  row.reshape(n))
  rows2 = jax.tree.map(lambda a: a.reshape((n,) + a.shape[len(batch_shape):]),
                       rows)
  # A chunk larger than the batch would only pad it: clamp it.
  chunk = min(cfg.chunk or default_chunk_size(n, _vocab(cfg, w)),
              max(n, 1))
  pad = -n % chunk
  if pad:
    x2 = jnp.pad(x2, ((0, pad), (0, 0)))
    y2 = jnp.pad(y2, (0, pad))
    row2 = jnp.pad(row2, (0, pad))
    rows2 = jax.tree.map(
        lambda a: jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)), rows2)
  cfg = cfg._replace(chunk=chunk)
  if cfg.vocab_axis is not None or cfg.batch_axes is not None:
    # The per-row inputs enter through vocabulary-invariant row terms:
    # cast, they would make the loss vary over the vocabulary axis.
    varying, (x2, w, bias) = _sharded.mesh_typing((x2, w, bias),
                                                  (y2, row2, hp, rows2))
    cfg = cfg._replace(varying=varying)
  out = _fused_jit(cfg, x2, w, bias, y2, row2, hp, rows2)
  return _reduce.shape_outputs(out, cfg.reduction, cfg.return_aux, batch_shape)
