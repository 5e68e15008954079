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
from typing import NamedTuple, cast

import jax
import jax.numpy as jnp
from jax import lax

from jax_softmax import _reduce, _sharded
from jax_softmax._aux import LossAux, grad_aux, row_aux
from jax_softmax._kernel import (
  Classes,
  Hyper,
  RowCotangents,
  RowStats,
  grad_hyper,
  grad_logits,
  label_weights,
  row_stats,
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


class _Need(NamedTuple):
  """Which gradients a sweep forms (the inputs that are perturbed)."""

  dx: bool = False
  dw: bool = False
  dbias: bool = False
  hyper: bool = False


class _Grads(NamedTuple):
  """Gradients of a sweep, float32, None where not formed; ``scale``
  multiplies ``dx``, ``dw`` and ``dbias`` (see :func:`_recount`)."""

  dx: jax.Array | None = None
  dw: jax.Array | None = None
  dbias: jax.Array | None = None
  hyper: Hyper | None = None
  scale: jax.Array | None = None


def _vocab(cfg: Config, w) -> int:
  """This device's vocabulary size (``V`` of ``w``'s layout)."""
  return w.shape[0] if cfg.vocab_major else w.shape[1]


def _classes(cfg: Config, w) -> Classes:
  return _sharded.classes_of(_vocab(cfg, w), cfg.vocab_axis)


class _Weights(NamedTuple):
  """``w`` in the matmuls' operand dtype, in one or both layouts: ``dv``
  ``(d, V)`` is the plain operand of the logits ``x_c @ dv``, ``vd``
  ``(V, d)`` that of ``dx_c = dz @ vd``. One is the input; the other is a
  copy made once per sweep when the policy wants plain products
  (``plain_w``), else None (that product takes the other transposed)."""

  dv: jax.Array | None
  vd: jax.Array | None

  @property
  def dtype(self):
    return (self.vd if self.dv is None else self.dv).dtype


def _weights(cfg: Config, w) -> _Weights:
  w = w.astype(compute_dtype(w.dtype) if cfg.policy.upcast else w.dtype)
  other = jnp.swapaxes(w, 0, 1) if cfg.policy.plain_w else None
  return _Weights(other, w) if cfg.vocab_major else _Weights(w, other)


def _dot(a, b, a_dim: int, b_dim: int):
  """``a . b`` contracting ``a_dim`` with ``b_dim``, float32 accumulated."""
  return lax.dot_general(a, b, (((a_dim,), (b_dim,)), ((), ())),
                         preferred_element_type=compute_dtype(a.dtype))


def _logits(x_c, ws: _Weights, bias):
  """``(c, V)`` float32 logits of one chunk (input dtype, f32 accumulate)."""
  z = _dot(x_c, ws.dv, 1, 0) if ws.dv is not None else _dot(x_c, ws.vd, 1, 1)
  return z if bias is None else z + bias.astype(z.dtype)[None, :]


def _matmuls(cfg: Config, x_c, xt_c, ws: _Weights, dz, keep, need: _Need):
  """``dx_c = dz w^T`` and ``dw_c = x_c^T dz`` (``dz^T x_c`` when ``w`` is
  ``(V, d)`` and ``xt_c`` is None), accumulated and returned in float32;
  ``dz`` is rounded to the operands' dtype once, before both.

  ``xt_c``, when given, is ``x_c^T`` as a ``(d, c)`` array: ``dw_c`` is
  then the plain ``(d, c) @ (c, V)`` product, ``(d, V)`` in both layouts
  (see :class:`MatmulPolicy`). Rows where ``keep`` is False (uncounted
  rows when only the loss is differentiated) may hold anything (NaN
  padding): they are zeroed for ``dw`` so that ``0 * NaN`` cannot reach
  it.
  """
  dz = dz.astype(x_c.dtype)
  dx = dw = None
  if need.dx:
    dx = _dot(dz, ws.vd, 1, 0) if ws.vd is not None else _dot(dz, ws.dv, 1,
                                                              1)
  if need.dw:
    if xt_c is not None:
      if keep is not None:
        xt_c = jnp.where(keep[None, :], xt_c, 0)
      dw = _dot(xt_c, dz, 1, 0)
    else:
      if keep is not None:
        x_c = jnp.where(keep[:, None], x_c, 0)
      dw = _dot(dz, x_c, 0, 0) if cfg.vocab_major else _dot(x_c, dz, 0, 0)
  return dx, dw


def _chunk_grads(cfg: Config, classes, z, chunk, hp: Hyper, st: RowStats,
                 aux, cot, aux_cot, need: _Need) -> _Grads:
  """One chunk's gradients: ``dz`` from the loss's per-row cotangents
  ``cot`` (or None) and the aux's ``(g_lse, g_entropy)``, then its matmuls.
  ``chunk`` is ``(x_c, xt_c, ws, y_c)``."""
  x_c, xt_c, ws, y_c = chunk
  g_lse, g_ent = aux_cot
  dz = jnp.zeros(z.shape, z.dtype)
  if cot is not None:
    dz = dz + grad_logits(z, y_c, None, hp, st, cot, int_labels=True,
                          classes=classes)
  if g_lse is not None or g_ent is not None:
    dz = dz + grad_aux(z, None, hp, aux, g_lse, g_ent, classes=classes)
  # Aux terms reach every row; the loss only counted ones.
  keep = st.counted if g_lse is None and g_ent is None else None
  dx, dw = _matmuls(cfg, x_c, xt_c, ws, dz, keep, need)
  dh = None
  if need.hyper and cot is not None:
    dh = grad_hyper(z, y_c, None, hp, st, cot, int_labels=True,
                    classes=classes)
  return _Grads(dx, dw, jnp.sum(dz, axis=0) if need.dbias else None, dh)


def _chunks(a, chunk):
  """``(n, ...) -> (n / chunk, chunk, ...)``, chunk ``j`` holding rows
  ``j, j + n / chunk, ...`` (strided): a batch split in blocks over
  devices then stays split inside every chunk (no all-gather)."""
  return jnp.swapaxes(a.reshape((chunk, -1) + a.shape[1:]), 0, 1)


def _flat(a):
  return jnp.swapaxes(a, 0, 1).reshape((-1,) + a.shape[2:])


def _add(acc, upd):
  return acc if upd is None else acc + upd


def _scan(cfg: Config, step, x, ws: _Weights, per_row, need: _Need,
          forms_dz: bool, forms_hyper: bool, hp: Hyper):
  """The single loop of this module: ``step(carry, chunk)`` over the row
  chunks of ``x`` and the per-row pytree ``per_row``, the carry being the
  ``dw``/``dbias``/hyperparameter accumulators (zeros where formed).
  ``step`` gets ``((x_c, per_row_c), xt_c)``, ``xt_c`` the chunk's ``x^T``
  when the policy wants a plain product for ``dw`` (``plain_dw``; then
  ``dw`` accumulates as ``(d, V)`` and a ``(V, d)`` ``w``'s is transposed
  once at the end). Returns the summed
  accumulators (hyperparameter gradients also summed over the devices
  holding other rows) and the flattened per-chunk outputs."""
  dtype = compute_dtype(x.dtype)
  # Mesh axes the rows vary over (the vocabulary axis is summed inside
  # grad_hyper).
  row_axes = tuple(a for a in cfg.varying if a != cfg.vocab_axis)

  def zeros(shape, dt, axes=cfg.varying):
    return _sharded.varying_zeros(shape, dt, axes)

  plain_dw = forms_dz and need.dw and cfg.policy.plain_dw
  given = ws.vd if cfg.vocab_major else ws.dv
  assert given is not None
  d, vocab = given.shape[::-1] if cfg.vocab_major else given.shape
  dw_shape = (d, vocab) if plain_dw or not cfg.vocab_major else (vocab, d)
  init = _Grads(
      dw=zeros(dw_shape, dtype) if forms_dz and need.dw else None,
      dbias=zeros(vocab, dtype) if forms_dz and need.dbias else None,
      hyper=jax.tree.map(lambda a: zeros(a.shape, a.dtype, row_axes), hp)
      if forms_hyper and need.hyper else None)
  xs = jax.tree.map(lambda a: _chunks(a, cfg.chunk), (x, per_row))
  # One (d, b) copy of x per sweep, for plain dw products.
  xt = (jnp.swapaxes(xs[0], 1, 2).astype(given.dtype) if plain_dw
        else None)
  acc, ys = lax.scan(step, init, (xs, xt))
  if plain_dw and cfg.vocab_major:
    acc = acc._replace(dw=jnp.swapaxes(cast(jax.Array, acc.dw), 0, 1))
  acc = acc._replace(hyper=_sharded.sum_over(acc.hyper, row_axes))
  return acc, jax.tree.map(_flat, ys)


def _accumulate(acc: _Grads, g: _Grads) -> _Grads:
  return _Grads(None, _add(acc.dw, g.dw), _add(acc.dbias, g.dbias),
                None if acc.hyper is None else jax.tree.map(
                    _add, acc.hyper, g.hyper))


def _stats(cfg: Config, classes, z, y_c, r_c, hp: Hyper, keep_exp: bool):
  """The chunk's row stats (and aux)."""
  st = row_stats(z, y_c, r_c, None, hp, int_labels=True, classes=classes,
                 keep_exp=keep_exp)
  aux = None
  if cfg.return_aux:
    aux = row_aux(z, y_c, st.counted, None, hp, int_labels=True,
                  classes=classes)
  return st, aux


def _forward_sweep(cfg: Config, x, w, bias, y, row, hp: Hyper,
                   need: _Need | None = None,
                   cot: RowCotangents | None = None):
  """Statistics (and aux) of every row; with the per-row cotangents
  ``cot`` of a unit output cotangent, also the gradients in ``need``.
  Returns ``(stats, aux, grads)`` (grads None without ``cot``)."""
  need = need or _Need()
  classes = _classes(cfg, w)
  ws = _weights(cfg, w)
  row_cot = None if cot is None else (cot.xent, cot.z_loss)

  def step(acc, inp):
    (x_c, (y_c, r_c, cot_c)), xt_c = inp
    x_c = x_c.astype(ws.dtype)
    z = _logits(x_c, ws, bias)
    # exp(z - m) is kept for this step's dz only (never a scan output).
    st, aux = _stats(cfg, classes, z, y_c, r_c, hp, keep_exp=cot is not None)
    dx = None
    if cot_c is not None:
      c = RowCotangents(*cot_c, cot.mean_xent)
      g = _chunk_grads(cfg, classes, z, (x_c, xt_c, ws, y_c), hp, st, aux, c,
                       (None, None), need)
      acc, dx = _accumulate(acc, g), g.dx
    return acc, (st._replace(exp=None), aux, dx)

  acc, (st, aux, dx) = _scan(cfg, step, x, ws, (y, row, row_cot), need,
                             cot is not None, False, hp)
  return st, aux, None if cot is None else acc._replace(dx=dx)


def _backward_sweep(cfg: Config, x, w, bias, y, hp: Hyper, need: _Need,
                    st: RowStats, aux, cot: RowCotangents | None, aux_cot):
  """The gradients in ``need`` for per-row cotangents ``cot`` (or None)
  and aux cotangents ``(g_lse, g_entropy)``, recomputing each chunk's
  logits from ``x`` and ``w``."""
  classes = _classes(cfg, w)
  ws = _weights(cfg, w)
  row_cot = None if cot is None else (cot.xent, cot.z_loss)

  def step(acc, inp):
    (x_c, (y_c, st_c, aux_c, cot_c, g_lse, g_ent)), xt_c = inp
    x_c = x_c.astype(ws.dtype)
    z = _logits(x_c, ws, bias)
    c = None if cot_c is None else RowCotangents(*cot_c, cot.mean_xent)
    g = _chunk_grads(cfg, classes, z, (x_c, xt_c, ws, y_c), hp, st_c, aux_c,
                     c, (g_lse, g_ent), need)
    return _accumulate(acc, g), g.dx

  acc, dx = _scan(cfg, step, x, ws, (y, st, aux, row_cot, *aux_cot), need,
                  True, cot is not None, hp)
  return acc._replace(dx=dx)


def _outputs(cfg: Config, st, aux, hp):
  loss = _reduce.reduce_rows(st, hp, cfg.reduction, cfg.batch_axes)
  return (loss, aux) if cfg.return_aux else loss


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(cfg: Config, x, w, bias, y, row, hp):
  st, aux, _ = _forward_sweep(cfg, x, w, bias, y, row, hp)
  return _outputs(cfg, st, aux, hp)


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
  aux: LossAux | None
  need: _Need


def _unit_cotangents(cfg: Config, w, bias, y, row, hp
                     ) -> tuple[RowStats, RowCotangents]:
  """Per-row cotangents of a unit output cotangent, before the loop, and
  the row stats they assume: a row counts iff it is unmasked and the bias
  leaves it a class (right unless infinite ``x`` or ``w`` drive a row's
  every logit to ``-inf``: see :func:`_recount`)."""
  classes = _classes(cfg, w)
  counted = row
  if bias is not None:
    has_class = (bias[None, :] != -jnp.inf).astype(jnp.int32)
    counted = row & (classes.max(has_class)[0] > 0)
  dtype = compute_dtype(w.dtype)
  w_y = label_weights(y, hp, classes.num_classes, dtype)
  zero = jnp.zeros(y.shape, dtype)
  pre = RowStats(lse=zero, xent=zero, counted=counted,
                 mean_weight=jnp.where(counted, w_y, 0.0), target_mass=zero,
                 support_size=zero, nan_row=zero.astype(bool), shift=zero,
                 log_sum=zero)
  return pre, _reduce.row_cotangents(pre, cfg.reduction, 1.0,
                                     int_labels=True,
                                     batch_axes=cfg.batch_axes)


def _recount(cfg: Config, pre: RowStats, st: RowStats, hp: Hyper):
  """The factor that makes gradients formed with the denominators of
  ``pre`` those of the rows ``st`` counted: ``d_pre / d_true`` (1 but for
  rows whose logits were all ``-inf``). Cross-entropy and z-loss terms
  share one factor unless class weights and z-loss are both on; where
  their factors then differ, NaN (no exact rescaling exists)."""
  d_pre = _reduce.denominators(pre, cfg.reduction, cfg.batch_axes)
  d_true = _reduce.denominators(st, cfg.reduction, cfg.batch_axes)
  ratio = d_pre[0] / d_true[0]
  if hp.z_loss is not None and hp.class_weights is not None:
    ratio = jnp.where(ratio == d_pre[1] / d_true[1], ratio, jnp.nan)
  return ratio


def _fused_fwd(cfg: Config, x, w, bias, y, row, hp):
  (x, dx_on), (w, dw_on), (bias, db_on), (y, _), (row, _), (hp, hp_on) = (
      _reduce.unwrap_primals(a) for a in (x, w, bias, y, row, hp))
  need = _Need(dx_on, dw_on, db_on, hp_on)
  if cfg.untyped_mesh and any(need):
    raise ValueError(
        "gradients of linear_cross_entropy with axis_name/batch_axis_name "
        "need jax.shard_map(..., check_vma=True) (the default): with "
        "check_vma=False the partial gradients of each device would not be "
        "summed.")
  in_forward = (cfg.reduction != "none" and not hp_on
                and cfg.grad_in_forward is not False)
  pre, cot = (_unit_cotangents(cfg, w, bias, y, row, hp) if in_forward
              else (None, None))
  st, aux, grads = _forward_sweep(cfg, x, w, bias, y, row, hp, need, cot)
  if grads is not None and pre is not None:
    grads = grads._replace(scale=_recount(cfg, pre, st, hp))
  return _outputs(cfg, st, aux, hp), _Residuals(
      grads=grads, features=x, weights=w, bias=bias, labels=y, hp=hp,
      stats=st, aux=aux, need=need)


def _fused_bwd(cfg: Config, res: _Residuals, g):
  g, aux_cot = _reduce.split_cotangent(g, cfg.return_aux)
  cot = None
  if res.grads is None:
    cot = _reduce.row_cotangents(res.stats, cfg.reduction, g,
                                 int_labels=True, batch_axes=cfg.batch_axes)
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
  # float32 until here: each gradient is rounded to its input's dtype once.
  dx, dw, db = (a if a is None or p is None else a.astype(p.dtype)
                for a, p in zip(out[:3], (res.features, res.weights,
                                          res.bias), strict=True))
  return dx, dw, db, None, None, out.hyper


_fused.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)
# Compiled once per configuration and shapes (eager calls stay fast).
_fused_jit = jax.jit(_fused, static_argnums=0)


def local_loss(cfg: Config, x, w, bias, labels, row, hp):
  """The fused loss over this device's rows (all rows off a mesh)."""
  batch_shape = x.shape[:-1]
  n = math.prod(batch_shape)
  x2, y2, row2 = (x.reshape(n, x.shape[-1]), labels.reshape(n),
                  row.reshape(n))
  # A chunk larger than the batch would only pad it: clamp it.
  chunk = min(cfg.chunk or default_chunk_size(n, _vocab(cfg, w)),
              max(n, 1))
  pad = -n % chunk
  if pad:
    x2 = jnp.pad(x2, ((0, pad), (0, 0)))
    y2 = jnp.pad(y2, (0, pad))
    row2 = jnp.pad(row2, (0, pad))
  cfg = cfg._replace(chunk=chunk)
  if cfg.vocab_axis is not None or cfg.batch_axes is not None:
    varying, (x2, w, bias) = _sharded.mesh_typing((x2, w, bias),
                                                  (y2, row2, hp))
    cfg = cfg._replace(varying=varying)
  out = _fused_jit(cfg, x2, w, bias, y2, row2, hp)
  return _reduce.shape_outputs(out, cfg.reduction, cfg.return_aux, batch_shape)
