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
  (float32 accumulator), and the hyperparameters' gradients (linear in
  the per-row cotangents). Residuals are those gradients, in float32; the
  backward pass scales them by the output cotangent and rounds each to its
  input's dtype once. Three matmuls in all, the minimum.
* **recompute in the backward pass** (``reduction="none"``,
  ``grad_in_forward=False``, differentiated class weights of a ``"mean"``
  or hyperparameters with ``return_aux``; aux cotangents add this sweep to
  the other): residuals are the inputs and the per-row statistics;
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
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_softmax import _matmuls, _reduce, _sharded
from jax_softmax._aux import (
  LossAux,
  grad_aux,
  grad_stats_entropy,
  row_aux,
  stats_entropy,
  used_rows,
)
from jax_softmax._chunks import (
  Config,
  Grads,
  Need,
  accumulate,
  add_grad,
  chunk_scan,
  default_chunk_size,
)
from jax_softmax._hypergrad import grad_hyper
from jax_softmax._kernel import (
  Classes,
  Hyper,
  RowCotangents,
  RowStats,
  grad_logits,
  label_weights,
  row_stats,
)
from jax_softmax._numerics import compute_dtype


def _vocab(cfg: Config, w) -> int:
  """This device's vocabulary size (``V`` of ``w``'s layout)."""
  return w.shape[0] if cfg.vocab_major else w.shape[1]


def _classes(cfg: Config, w) -> Classes:
  return _sharded.classes_of(_vocab(cfg, w), cfg.vocab_axis)


def _chunk_grads(cfg: Config, classes, z, chunk, hp: Hyper, st: RowStats,
                 aux, cot, aux_cot, need: Need) -> Grads:
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
  # The loss and an objective reach counted rows only; aux terms also the
  # rows with a nonzero aux cotangent. Others may hold NaN features.
  keep = st.counted if objective else st.counted | used_rows(
      g_lse, g_ent, z.shape[0])
  # Rounded once, before both of its products (as on GPU and TPU).
  dz_w = dz.astype(ws.dtype)
  dx = _matmuls.grad_dx(dz_w, ws) if need.dx else None
  dh = None
  if need.hyper and cot is not None:
    # An objective's aux is its rows' entropy (no cap there), not a
    # LossAux.
    dh = grad_hyper(z, y_c, None, hp, st, cot, int_labels=True,
                    classes=classes, dz=dz,
                    aux=None if objective else aux, aux_cot=aux_cot)
  return Grads(dx, None, jnp.sum(dz, axis=0) if need.dbias else None, dh,
                dz=(dz_w, keep) if need.dw else None)


def _stats(cfg: Config, classes, z, y_c, r_c, hp: Hyper, keep_exp: bool):
  """The chunk's row stats and aux: the :class:`LossAux` with
  ``return_aux``, the rows' entropy (from the stats) for an objective."""
  objective = cfg.objective is not None
  # An objective recomputes exp(z - m): its entropy's reductions over a
  # kept exp made XLA hold one more (chunk, V) block, for no speed.
  st = row_stats(z, y_c, r_c, None, hp, int_labels=True, classes=classes,
                 keep_exp=keep_exp and not objective)
  aux = None
  if objective:
    aux = stats_entropy(z, st, hp, classes)
  elif cfg.return_aux:
    aux = row_aux(z, y_c, st.counted, None, hp, int_labels=True,
                  classes=classes)
  return st, aux


def _forward_sweep(cfg: Config, x, w, bias, y, row, hp: Hyper,
                   rows: _reduce.PerRow, need: Need | None = None,
                   cot: RowCotangents | None = None):
  """Statistics (and aux, and the objective's per-row values) of every
  row; with the per-row cotangents ``cot`` of a unit output cotangent, also
  the gradients in ``need`` (those of the objective's arguments included).
  Returns ``(stats, aux, objective values, grads)``."""
  need = need or Need()
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
      acc, dx, dz = accumulate(acc, g), g.dx, g.dz
    st = st._replace(exp=None, exp_label=None)
    return acc, ((st, aux, f, dx, d_args), dz)

  acc, (st, aux, f, dx, d_args) = chunk_scan(
      cfg, step, x, ws, (y, row, row_cot, rows), need, cot is not None,
      cot is not None, hp)
  if cot is None:
    return st, aux, f, None
  d_weights = _reduce.weight_grad(st, cot, rows.weights)
  return st, aux, f, acc._replace(dx=dx, rows=_reduce.PerRow(
      d_weights, () if d_args is None else d_args))


def _backward_sweep(cfg: Config, x, w, bias, y, hp: Hyper, need: Need,
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
    return accumulate(acc, g), (g.dx, g.dz)

  acc, dx = chunk_scan(cfg, step, x, ws, (y, st, aux, row_cot, *aux_cot), need,
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

  grads: Grads | None
  features: jax.Array
  weights: jax.Array
  bias: jax.Array | None
  labels: jax.Array
  hp: Hyper
  stats: RowStats
  aux: LossAux | jax.Array | None   # see _stats
  need: Need
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
  cw_on = _reduce.unwrap_primals(hp.class_weights)[1]
  (x, dx_on), (w, dw_on), (bias, db_on), (y, _), (row, _), (hp, hp_on), (
      rows, rows_on) = (_reduce.unwrap_primals(a) for a in (
          x, w, bias, y, row, hp, rows))
  need = Need(dx_on, dw_on, db_on, hp_on, rows_on)
  if cfg.untyped_mesh and any(need):
    raise ValueError(
        "gradients of linear_cross_entropy with axis_name/batch_axis_name "
        "need jax.shard_map(..., check_vma=True) (the default): with "
        "check_vma=False the partial gradients of each device would not be "
        "summed.")
  # The hyperparameters' gradients are linear in the per-row cotangents,
  # so they too form in the forward pass, except the class weights' of a
  # "mean" (its denominator's term needs the mean, known after the loop)
  # and with aux outputs (whose cotangents reach the cap and temperature).
  in_forward = (cfg.reduction != "none" and cfg.grad_in_forward is not False
                and not (hp_on and cfg.return_aux)
                and not (cw_on and cfg.reduction == "mean"))
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
  out = Grads()
  if cot is not None or aux_cot != (None, None):
    out = _backward_sweep(cfg, res.features, res.weights, res.bias,
                          res.labels, res.hp, res.need, res.stats, res.aux,
                          cot, aux_cot)
  if res.grads is not None:  # the loss's share, formed in the forward pass
    g = g if res.grads.scale is None else g * res.grads.scale
    out = out._replace(**{
        k: add_grad(g * a, getattr(out, k)) for k, a in zip(
            ("dx", "dw", "dbias"), res.grads[:3], strict=True)
        if a is not None})
    if res.grads.hyper is not None:
      out = out._replace(hyper=jax.tree.map(lambda a: g * a,
                                            res.grads.hyper))
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
