"""Post-training objectives: any per-token function of (log p, entropy).

:func:`log_prob_objective` on logits, :func:`linear_log_prob_objective` on
the fused path (the gradient formed inside the chunk loop, three matmuls).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jax_softmax import _checks, _reduce
from jax_softmax._kernel import make_hyper
from jax_softmax._linear_ce import fused_call
from jax_softmax._losses import rows_with_aux
from jax_softmax._numerics import (
  compute_dtype,
  unflatten_rows,
)

_DOC_FN = """
  Per counted row ``i`` the objective is ``fn(log_p[i], entropy[i],
  *[a[i] for a in fn_args])``, with ``log_p = log softmax(z / T)[y]`` the
  label's log-probability and ``entropy = -sum_c p_c log p_c`` that of the
  softmax of ``z / T``. ``fn`` is a JAX function of ``(rows,)`` arrays
  (and the arguments' rows) that acts row-wise and returns ``(rows,)``;
  uncounted rows (masked, ``ignore_index``, no class left) give 0, are left
  out of the mean and see 0 for every input of ``fn``. ``"mean"`` divides
  the sum over counted rows by their count; ``"sum"``; ``"none"`` gives
  the per-row values. Gradients with respect to the logits (or ``x``, ``w``,
  ``bias``), the ``fn_args`` and ``temperature`` are exact; ``fn`` is
  differentiated with ``jax.vjp``. ``fn`` is part of the compiled
  program's key: pass the same function object to reuse a compilation.
"""


def log_prob_objective(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    fn: Callable,
    fn_args: tuple = (),
    *,
    axis: int | tuple[int, ...] = -1,
    where: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = -100,
    temperature: jax.typing.ArrayLike = 1.0,
    reduction: str = "mean",
) -> jax.Array:
  """A per-token objective of the label's log-probability and the entropy.
  {fn}
  Args:
    logits: ``(..., classes)`` floating logits.
    labels: integer labels of the batch shape.
    fn: ``fn(log_p, entropy, *row_args) -> (rows,)`` floating values.
    fn_args: floating arrays whose leading dimensions are the batch shape.
    axis, where, ignore_index: as in :func:`cross_entropy`.
    temperature: positive scalar ``T`` (may be traced).
    reduction: ``"mean"``, ``"sum"`` or ``"none"``.

  Returns:
    A scalar, or the per-row values of the batch shape for ``"none"``.
    NaN or ``+inf`` logits in a counted row give NaN for that row.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jax_softmax import log_prob_objective
    >>> logits = jnp.array([[0.0, 0.0], [2.0, 0.0]])
    >>> reward = jnp.array([1.0, -1.0])
    >>> log_prob_objective(logits, jnp.array([0, 0]),
    ...                    lambda lp, h, r: -r * lp, (reward,),
    ...                    reduction="none")
    Array([ 0.6931472, -0.126928 ], dtype=float32)
  """
  _checks.check_reduction(reduction)
  r = _checks.logit_rows(logits, labels, axis, where, ignore_index, False)
  if not r.int_labels:
    raise TypeError("log_prob_objective takes integer labels; got dtype "
                    f"{jnp.asarray(labels).dtype}.")
  dtype = compute_dtype(r.logits.dtype)
  hp = make_hyper(0.0, 0.0, None, None, r.logits.shape[-1], dtype,
                  temperature)
  args = _checks.objective_args(fn_args, r.batch_shape,
                                batch_spec=r.batch_spec)
  xent, aux = rows_with_aux(r, hp)
  # Counted: unmasked, not ignored, a class left (lse > -inf; NaN counts).
  counted = r.row_mask & (aux.lse != -jnp.inf)
  st = _reduce.stats_of(xent, counted, counted.astype(xent.dtype))
  f = _reduce.objective_rows(fn, st, aux.entropy, args)
  out = _reduce.reduce_objective(f, st, reduction)
  return (unflatten_rows(out, r.batch_shape, r.batch_spec)
          if reduction == "none" else out)


def linear_log_prob_objective(
    x: jax.typing.ArrayLike,
    w: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    fn: Callable,
    fn_args: tuple = (),
    *,
    bias: jax.typing.ArrayLike | None = None,
    where: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = -100,
    temperature: jax.typing.ArrayLike = 1.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
    w_layout: str = "dv",
    axis_name: str | None = None,
    batch_axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
  """:func:`log_prob_objective` of ``x @ w + bias`` without the logits.
  {fn}
  As :func:`linear_cross_entropy` does, rows run in chunks and a chunk's
  ``(chunk, V)`` logits live only inside one step. For ``"mean"`` and
  ``"sum"`` the gradient is formed in the forward pass: per chunk, the
  per-row ``d fn / d log_p`` and ``d fn / d entropy`` come from
  ``jax.vjp`` of ``fn`` at that chunk's values (the mean's denominator is
  known before the loop), then the three matmuls; the gradients of the
  ``fn_args`` and ``temperature`` come from the same pass. ``"none"``
  recomputes the logits in the backward pass (four matmuls). Data- and
  vocabulary-parallel as :func:`linear_cross_entropy` (entropy and
  log-probabilities over the global vocabulary).

  ``fn`` is a static part of the compiled program (as a function passed to
  ``jax.jit`` is): a global it reads is read when it is first traced, and
  it may not close over a traced value (an array of an enclosing
  ``jax.jit``, ``grad`` or ``vmap``: a ``ValueError``); pass such values
  through ``fn_args`` as per-row arrays (``jnp.full(labels.shape, c)``),
  which also gives their gradient. :func:`log_prob_objective` has neither
  limit.

  Args:
    x, w, labels, bias, where, ignore_index: as in
      :func:`linear_cross_entropy`.
    chunk_size, w_layout, axis_name, batch_axis_name: as in
      :func:`linear_cross_entropy`.
    fn, fn_args, temperature, reduction: as in :func:`log_prob_objective`.

  Returns:
    A scalar, or the per-row values of the labels' shape for ``"none"``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jax_softmax import linear_log_prob_objective
    >>> h = jax.random.normal(jax.random.key(0), (6, 4))
    >>> emb = jax.random.normal(jax.random.key(1), (20, 4))
    >>> tokens = jnp.arange(6)
    >>> old_logp, adv = -3.0 * jnp.ones(6), jnp.linspace(-1.0, 1.0, 6)
    >>> def ppo(logp, entropy, old_logp, adv):
    ...   ratio = jnp.exp(logp - old_logp)
    ...   return (-jnp.minimum(ratio * adv, jnp.clip(ratio, 0.8, 1.2) * adv)
    ...           - 0.01 * entropy)
    >>> loss = linear_log_prob_objective(h, emb, tokens, ppo,
    ...                                  (old_logp, adv), w_layout="vd")
    >>> loss.shape
    ()
  """
  _checks.check_reduction(reduction)
  return fused_call(
      "linear_log_prob_objective", x, w, labels, reduction=reduction,
      chunk_size=chunk_size, w_layout=w_layout, bias=bias, where=where,
      ignore_index=ignore_index, axis_name=axis_name,
      batch_axis_name=batch_axis_name,
      hyper=(0.0, 0.0, None, None, temperature), objective=fn,
      fn_args=fn_args)


log_prob_objective.__doc__ = (log_prob_objective.__doc__ or "").format(
    fn=_DOC_FN)
linear_log_prob_objective.__doc__ = (
    linear_log_prob_objective.__doc__ or "").format(fn=_DOC_FN)
