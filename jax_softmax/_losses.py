"""Cross-entropy losses from logits, with hand-written gradients.

The public losses on logits: :func:`cross_entropy`, the optax drop-ins and
:func:`nll_loss`. Each lays its arguments out as ``(rows, classes)``
(:func:`_to_rows`) and applies the row kernel (:mod:`jax_softmax._kernel`)
inside one ``jax.custom_vjp``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_softmax import _checks
from jax_softmax._aux import LossAux, grad_aux, row_aux
from jax_softmax._hypergrad import grad_hyper
from jax_softmax._kernel import (
  Classes,
  Hyper,
  RowStats,
  grad_logits,
  grad_target,
  make_hyper,
  row_stats,
  take_rows,
)
from jax_softmax._numerics import (
  clean_rows,
  compute_dtype,
  sharded_like,
  unflatten_rows,
)
from jax_softmax._primitives import logsumexp
from jax_softmax._reduce import (
  reduce_rows,
  row_cotangents,
  shape_outputs,
  split_cotangent,
  unwrap_primals,
  weight_grad,
)


class _Config(NamedTuple):
  """The static configuration of one :func:`cross_entropy` call."""

  reduction: str
  int_labels: bool
  return_aux: bool = False


def _outputs(cfg: _Config, z, target, row, class_mask, hp: Hyper, weights):
  """``(outputs, row stats, aux)`` of the loss on ``(rows, C)`` logits."""
  classes = Classes(z.shape[-1])
  st = row_stats(z, target, row, class_mask, hp, int_labels=cfg.int_labels,
                 classes=classes, keep_exp=True)
  loss = reduce_rows(st, hp, cfg.reduction, weights=weights)
  if not cfg.return_aux:
    return loss, st, None
  aux = row_aux(z, target, st.counted, class_mask, hp,
                int_labels=cfg.int_labels, classes=classes)
  return (loss, aux), st, aux


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _cross_entropy(cfg: _Config, z, target, row, class_mask, hp: Hyper,
                   weights):
  return _outputs(cfg, z, target, row, class_mask, hp, weights)[0]


class _Residuals(NamedTuple):
  logits: jax.Array
  target: jax.Array
  class_mask: jax.Array | None
  hp: Hyper
  stats: RowStats
  aux: LossAux | None
  weights: jax.Array | None


def _cross_entropy_fwd(cfg: _Config, z, target, row, class_mask, hp,
                       weights):
  z, target, row, class_mask, hp, weights = (unwrap_primals(a)[0] for a in (
      z, target, row, class_mask, hp, weights))
  out, st, aux = _outputs(cfg, z, target, row, class_mask, hp, weights)
  if not cfg.int_labels:
    target = clean_rows(target, st.counted)
  return out, _Residuals(logits=z, target=target, class_mask=class_mask,
                         hp=hp, stats=st, aux=aux, weights=weights)


def _cross_entropy_bwd(cfg: _Config, res: _Residuals, g):
  g, (g_lse, g_ent) = split_cotangent(g, cfg.return_aux)
  z, target, class_mask, hp, st = res[:5]
  classes = Classes(z.shape[-1])
  cot = row_cotangents(st, cfg.reduction, g, int_labels=cfg.int_labels,
                       weights=res.weights)
  dz = grad_logits(z, target, class_mask, hp, st, cot,
                   int_labels=cfg.int_labels, classes=classes)
  if g_lse is not None or g_ent is not None:
    assert res.aux is not None
    dz = dz + grad_aux(z, class_mask, hp, res.aux, g_lse, g_ent,
                       classes=classes)
  dt = None
  if not cfg.int_labels:
    dt = sharded_like(grad_target(z, class_mask, hp, st, cot),
                      target).astype(target.dtype)
  dhp = grad_hyper(z, target, class_mask, hp, st, cot,
                   int_labels=cfg.int_labels, classes=classes, dz=dz,
                   aux=res.aux, aux_cot=(g_lse, g_ent))
  return (_one_buffer(dz.astype(z.dtype), z), dt, None, None, dhp,
          weight_grad(st, cot, res.weights))


def _one_buffer(dz, z):
  """``dz`` made once, as one buffer, in the sharding of the logits ``z``
  (on Explicit mesh axes JAX may infer another for ``dz``). XLA fuses an
  elementwise ``dz`` into each of its consumers: for ``(B, T, V)`` logits
  from a matmul the weight gradient's dot reads a transposed copy of
  ``dz``, which would recompute ``dz`` and keep the residuals alive beside
  both (1.5 times optax's memory). A scatter is not fused into its
  consumers; this one multiplies one entry per row by 1 (NaN, infinities
  and signed zeros unchanged)."""
  if not dz.size:
    return dz
  return dz.at[:, 0].multiply(1, out_sharding=jax.typeof(z).sharding)


_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd,
                      symbolic_zeros=True)
# Compiled once per configuration and shapes, so eager calls do not run
# the kernel op by op (under an outer jit this is inlined).
_cross_entropy_jit = jax.jit(_cross_entropy, static_argnums=0)


def cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    axis: int | tuple[int, ...] = -1,
    where: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = -100,
    label_smoothing: jax.typing.ArrayLike = 0.0,
    class_weights: jax.typing.ArrayLike | None = None,
    z_loss: jax.typing.ArrayLike = 0.0,
    soft_cap: jax.typing.ArrayLike | None = None,
    reduction: str = "mean",
    check_labels: bool = False,
    return_aux: bool = False,
    weights: jax.typing.ArrayLike | None = None,
    temperature: jax.typing.ArrayLike = 1.0,
) -> jax.Array | tuple[jax.Array, LossAux]:
  r"""Softmax cross-entropy from logits, with a hand-written gradient.

  With ``p = softmax(z)`` over the support ``S`` (classes whose logit is not
  ``-inf`` and not masked), ``K = |S|``, class weights ``w`` (default 1) and
  smoothing ``eps``, the loss of a row with integer label ``y`` is

  .. math::
    \ell = (1-\varepsilon)\, w_y (-\log p_y)
      + \frac{\varepsilon}{K} \sum_{c \in S} w_c (-\log p_c)

  and with probability targets ``t`` (``q = (1-eps) t + eps/K`` on ``S``)

  .. math::
    \ell = -\sum_c w_c\, q_c \log p_c ,

  computed as ``-log p_c = log sum_S exp(z - m) - (z_c - m)`` with ``m``
  the row maximum. ``z_loss`` adds ``z_loss * lse**2`` per row;
  ``soft_cap`` first maps ``z -> soft_cap * tanh(z / soft_cap)`` (``-inf``
  stays ``-inf``), and lse and z-loss use the capped logits.

  Reductions: ``"none"`` returns ``ℓ + z_loss * lse**2`` per row (0 on
  uncounted rows); ``"sum"`` sums it; ``"mean"`` divides the summed ``ℓ``
  by ``sum w_y`` over counted rows (integer labels; the row count for
  probability targets) and the summed z-loss by the counted-row count. An
  all-ignored batch gives 0. This is ``torch.nn.functional.cross_entropy``,
  except that smoothing spreads over ``S`` only and the empty mean is 0.

  The gradient is ``(a p - t_w) * cotangent`` per row, ``a`` the row's total
  target weight and ``t_w`` the weighted target distribution (plus
  ``2 z_loss lse p`` and the cap's ``1 - tanh**2`` factor). Hyperparameters
  may be traced; their gradients are exact, and so is the gradient with
  respect to probability targets (``(1-eps) w_c (-log p_c)`` on ``S``, 0
  off it).

  Args:
    logits: ``(..., classes)`` floating logits (any dtype; computed in
      float32 or wider).
    labels: integer class indices of the logits' shape without the class
      axis, or floating probabilities of the logits' shape.
    axis: the class axis (int, or a tuple of axes flattened into one).
    where: boolean mask. Of the logits' rank: a class mask (masked classes
      act as ``-inf`` logits). Otherwise a row mask broadcast to the batch
      shape. A row with no class left counts as ignored.
    ignore_index: integer label whose rows are ignored (default ``-100``,
      PyTorch's; None for none). Labels of any integer dtype work for any
      class count.
    label_smoothing: ``eps`` in ``[0, 1]``.
    class_weights: ``(classes,)`` weights ``w``. A term whose weight is 0
      is 0 even where ``-log p`` is ``+inf``; weights summing to 0 over the
      counted rows make the ``"mean"`` NaN (0 / 0), as in PyTorch.
    z_loss: coefficient ``>= 0`` of ``lse**2``.
    soft_cap: positive finite cap, or None (a huge cap is no cap).
    reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    check_labels: also check traced integer labels, through
      ``jax.experimental.checkify``: run the caller under
      ``checkify.checkify(jax.jit(f))`` and call ``err.throw()``.
    return_aux: also return a :class:`LossAux` of per-row ``lse``,
      ``entropy``, ``argmax`` and ``correct`` (computed in the same call;
      ``lse`` and ``entropy`` are differentiable, with hand-written
      gradients, which also reach ``soft_cap`` and ``temperature``).
    weights: optional per-row floating weights of the batch shape (may be
      negative, e.g. advantages, traced and differentiated): each row's
      cross-entropy term is multiplied by its weight; the z-loss is not,
      and the ``"mean"`` denominator is unchanged, so a weighted mean is
      ``reduction="sum"`` divided by ``sum(weights)``. The gradient with
      respect to a weight is its row's cross-entropy term (times the
      reduction's scale).
    temperature: positive scalar ``T`` (may be traced; its gradient is
      exact): the logits are divided by it before anything else (the soft
      cap then applies to ``z / T``; the aux outputs are those of the
      scaled logits).

  Returns:
    A scalar (``"mean"``, ``"sum"``) or the batch-shaped per-row loss
    (``"none"``), of dtype ``result_type(logits, float32)``; with
    ``return_aux=True``, ``(loss, aux)``.

    Special values, per row: an uncounted row (masked, ``ignore_index``, no
    class left) gives loss 0 and gradient exactly 0 whatever it holds; NaN
    or ``+inf`` in a counted row gives NaN loss and gradient for that row
    only; a target logit of ``-inf`` (or a masked target) gives ``+inf`` with
    a finite gradient; ``-inf`` non-target logits get gradient 0; a label
    outside ``[0, classes)`` that is not ``ignore_index`` gives NaN, and
    raises ``ValueError`` naming it and its position when labels are
    concrete (or with ``check_labels=True`` under checkify).

  Raises:
    TypeError: non-floating logits, labels neither integer nor floating,
      non-boolean ``where``.
    ValueError: bad ``axis``, shapes, ``reduction``, or a bad concrete
      label.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jax_softmax import cross_entropy
    >>> logits = jnp.array([[1000.0, 0.0], [0.0, -1000.0]])
    >>> cross_entropy(logits, jnp.array([1, 1]), reduction="none")
    Array([1000., 1000.], dtype=float32)

  Note:
    A ``jax.custom_vjp`` function: reverse mode (``grad``, ``jacrev``) is
    supported, and so are second derivatives through the hand-written
    backward, in reverse (grad of grad, ``jax.jacrev(jax.grad(f))``) or
    forward mode (``jax.hessian``, ``jax.jvp(jax.grad(f), ...)``); a
    direct ``jax.jvp`` / ``jax.jacfwd`` of the loss is not.
  """
  _checks.check_reduction(reduction)
  r = _checks.logit_rows(logits, labels, axis, where, ignore_index,
                         check_labels)
  dtype = compute_dtype(r.logits.dtype)
  hp = make_hyper(label_smoothing, z_loss, soft_cap, class_weights,
                  r.logits.shape[-1], dtype, temperature)
  out = _cross_entropy_jit(_Config(reduction, r.int_labels, return_aux),
                           r.logits, r.target, r.row_mask, r.class_mask, hp,
                           _checks.row_weights(weights, r.batch_shape,
                                               dtype, batch_spec=r.batch_spec))
  return shape_outputs(out, reduction, return_aux, r.batch_shape,
                       r.batch_spec)


def rows_with_aux(r: _checks.LogitRows, hp: Hyper):
  """Per-row ``-log p_y`` (unreduced) and :class:`LossAux` of integer
  labels laid out as ``r``, with the hand-written gradients of both."""
  return _cross_entropy_jit(_Config("none", True, True), r.logits, r.target,
                            r.row_mask, r.class_mask, hp, None)


def _optax_drop_in(logits, labels, axis, where) -> jax.Array:
  """Per-row :func:`cross_entropy` with optax's reading of ``where``.

  optax drops masked classes from the sum over classes: probability mass
  on a masked class is left out (here: zeroed before the loss), and a
  masked integer target is scored by its raw logit, ``lse - z_y`` with
  ``lse`` over the unmasked classes (its gradient ``p - onehot(y)``
  reaches the masked target). ``cross_entropy`` itself gives ``+inf``
  for both.
  """
  r = _checks.logit_rows(logits, labels, axis, where, None, False)
  z, target, cmask = r.logits, r.target, r.class_mask
  if cmask is not None and not r.int_labels:
    target = jnp.where(cmask, target, 0.0)
  out = _cross_entropy_jit(_Config("none", r.int_labels), z, target,
                           r.row_mask, cmask, Hyper(), None)
  if cmask is not None and r.int_labels:
    n = z.shape[-1]
    in_range = (target >= 0) & (target < n)
    y = jnp.clip(target, 0, n - 1)
    masked = in_range & ~take_rows(cmask, y) & jnp.any(cmask, axis=-1)
    zf = z.astype(out.dtype)   # the loss's dtype (float32 for halves)
    raw = logsumexp(zf, axis=-1, where=cmask) - take_rows(zf, y)
    out = jnp.where(masked & r.row_mask, raw.astype(out.dtype), out)
  return unflatten_rows(out, r.batch_shape, r.batch_spec)


def softmax_cross_entropy_with_integer_labels(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  """Drop-in for ``optax.softmax_cross_entropy_with_integer_labels``.

  Per-example ``-log softmax(logits)[label]`` of the batch shape, with a
  hand-written gradient. Same signature and results as optax wherever
  optax's result is finite and correct, ``where`` masks included (a class
  mask that hides the target scores it by its raw logit, as optax does).
  Departures: a label outside ``[0, classes)`` gives NaN for its row, and
  concrete labels raise ``ValueError`` naming it (optax wraps negative
  labels), there is no ``ignore_index``, and the loss is float32 for
  bfloat16/float16 logits.

  Args:
    logits: ``(..., classes)`` floating logits.
    labels: integer labels of the batch shape.
    axis: the class axis (int, or a tuple flattened into one).
    where: optional boolean mask: of the logits' rank, a class mask; else a
      row mask broadcast to the batch shape (masked rows give 0).

  Returns:
    The per-example loss, of the batch shape.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jax_softmax import softmax_cross_entropy_with_integer_labels
    >>> softmax_cross_entropy_with_integer_labels(
    ...     jnp.array([[0.0, 0.0], [1000.0, 0.0]]), jnp.array([0, 1]))
    Array([6.931472e-01, 1.000000e+03], dtype=float32)
  """
  return _optax_drop_in(logits, labels, axis, where)


def softmax_cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  """Drop-in for ``optax.softmax_cross_entropy`` (probability labels).

  ``-sum_c labels_c log softmax(logits)_c`` per example, with a
  hand-written gradient. Like optax it accepts integer (one-hot) labels
  and labels that broadcast to the logits' shape, and leaves masked
  classes (``where`` of the logits' rank) out of the sum. Departures:
  ``-inf`` logits on classes with zero target mass give a finite loss
  (optax: NaN), and the loss is float32 for bfloat16/float16 logits and
  labels. The gradient with respect to ``labels`` is exact on the support
  and 0 on masked classes or rows and on ``-inf`` logits (optax: NaN or
  ``+inf`` there).

  Args:
    logits: ``(..., classes)`` floating logits.
    labels: probabilities (or integer one-hot labels) broadcastable to the
      logits' shape.
    axis: the class axis (int, or a tuple flattened into one).
    where: optional boolean mask: of the logits' rank, a class mask (those
      classes leave the sum); else a row mask broadcast to the batch shape.

  Returns:
    The per-example loss, of the batch shape.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jax_softmax import softmax_cross_entropy
    >>> softmax_cross_entropy(jnp.array([[0.0, -jnp.inf]]),
    ...                       jnp.array([[1.0, 0.0]]))
    Array([0.], dtype=float32)
  """
  z = _checks.as_float_array(logits, "logits")
  t = jnp.asarray(labels)
  if _checks.label_kind(t):   # integer one-hot labels
    t = t.astype(compute_dtype(z.dtype))
  try:
    t = jnp.broadcast_to(t, z.shape)
  except ValueError:
    raise ValueError(f"labels of shape {t.shape} do not broadcast to the "
                     f"logits' shape {z.shape}.") from None
  return _optax_drop_in(z, t, axis, where)
