"""``linear_cross_entropy``: validation and dispatch of the fused loss.

The sweeps are :mod:`jax_softmax._fused` (their loop
:mod:`jax_softmax._chunks`); the mesh handling
:mod:`jax_softmax._sharded`.
"""

from __future__ import annotations

import jax

from jax_softmax import _checks, _sharded
from jax_softmax._aux import LossAux
from jax_softmax._chunks import Config
from jax_softmax._fused import local_loss
from jax_softmax._kernel import make_hyper
from jax_softmax._numerics import compute_dtype, matmul_policy
from jax_softmax._reduce import PerRow


def linear_cross_entropy(
    x: jax.typing.ArrayLike,
    w: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    bias: jax.typing.ArrayLike | None = None,
    chunk_size: int | None = None,
    reduction: str = "mean",
    where: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = -100,
    label_smoothing: jax.typing.ArrayLike = 0.0,
    class_weights: jax.typing.ArrayLike | None = None,
    z_loss: jax.typing.ArrayLike = 0.0,
    soft_cap: jax.typing.ArrayLike | None = None,
    grad_in_forward: bool | None = None,
    axis_name: str | None = None,
    batch_axis_name: str | tuple[str, ...] | None = None,
    return_aux: bool = False,
    w_layout: str = "dv",
    weights: jax.typing.ArrayLike | None = None,
    temperature: jax.typing.ArrayLike = 1.0,
) -> jax.Array | tuple[jax.Array, LossAux]:
  r"""``cross_entropy(x @ w + bias, labels, ...)`` without the logits.

  Same value and gradients as :func:`cross_entropy` on the logits
  ``z = x @ w + bias`` for every option, but the ``(batch, V)`` logits are
  never held: rows are processed in chunks of ``chunk_size``, and a chunk's
  ``(chunk, V)`` logits, softmax and gradient live only inside one step.

  Cost. For ``"mean"``/``"sum"`` the gradient is computed in the forward
  pass: ``x w``, ``g w^T`` and ``x^T g`` per chunk, the three-matmul floor
  ``6 b d V`` FLOPs; residuals are ``dx``, ``dw``, ``dbias``. With
  ``reduction="none"`` (per-row cotangents are honoured),
  ``grad_in_forward=False`` (small residuals: ``x``, ``w``, ``(b,)``
  statistics, e.g. under remat), ``return_aux`` with differentiated
  hyperparameters, or differentiated ``class_weights`` of a ``"mean"``
  (its denominator needs the loss), the backward pass recomputes the
  logits (four matmuls); the other hyperparameters' gradients (smoothing,
  z-loss, cap, temperature) come from the forward pass. Non-zero aux
  cotangents add one recomputing sweep (three more matmuls). A call that
  is not differentiated computes the loss only. A frozen ``x`` or ``w``
  skips its gradient matmul.

  Memory: about ``3 * 4 * chunk * V`` bytes of chunk temporaries plus the
  float32 ``dw`` accumulator ``(d, V)`` and ``dx`` ``(b, d)`` (and, on
  XLA's CPU backend when a ``(d, V)`` ``w`` is differentiated, a
  transposed copy of ``x`` for ``dw``'s matmul). When the whole batch's
  ``dz`` in the input dtype takes no more room than that accumulator
  (``b * itemsize <= 4 * d``), it is kept instead and ``dw`` is one
  product over the batch (no accumulator). ``chunk_size=None`` picks
  ``chunk`` from ``CHUNK_BUDGET_BYTES`` (128 MiB). Any ``b`` works: a
  batch that no chunk divides is padded (a copy of ``x``, never of ``w``),
  a ``chunk_size`` above the batch is clamped to it, and an empty batch
  gives 0 (``"none"``: an empty array) with zero gradients.

  Sharding. Under ``jit`` with the batch split over mesh axes: on
  ``Explicit`` axes each device runs the chunk loop on its own rows; on
  ``Auto`` axes the strided chunks keep each device on its own rows when
  the chunk is a multiple of the number of batch shards and divides the
  batch (else the padded batch is gathered: exact, but slower). Inside
  ``shard_map`` use ``axis_name`` / ``batch_axis_name``.

  Precision: matmuls take the inputs' dtype with float32 accumulation
  (``preferred_element_type``), ``dz`` rounded to that dtype once before
  its two products; the softmax math, ``dw`` and ``dbias`` accumulate in
  float32; gradients come back in their inputs' dtypes (rounded once), the
  loss in ``result_type(x, float32)``. The operands' layout follows the
  backend (``MatmulPolicy``): on XLA's CPU backend, where the CPU has
  bfloat16 dot instructions (AVX512-BF16 or AMX-BF16), every bfloat16
  product is a plain row-major one (a transposed copy of ``w``, ``2 d V``
  bytes, and of ``x`` per pass); float16, which that backend has no
  kernels for, and bfloat16 on other CPUs (where its products are slower
  than float32's) are converted to float32 once per pass (one float32
  copy of ``w``; ``dz`` then stays float32).

  Args:
    x: ``(..., d)`` features (leading batch dimensions allowed).
    w: ``(d, V)`` weights, or ``(V, d)`` with ``w_layout="vd"``.
    labels: integer labels of ``x``'s batch shape.
    bias: optional ``(V,)``; a ``-inf`` entry masks that vocabulary slot.
    chunk_size: rows per chunk, or None for the memory budget.
    reduction, where, ignore_index, label_smoothing, class_weights: as in
      :func:`cross_entropy` (``where`` is a row mask of the labels' shape).
    z_loss, soft_cap: as in :func:`cross_entropy`.
    grad_in_forward: None chooses (True for scalar reductions); False
      forces recomputation in the backward pass; True with
      ``reduction="none"`` is an error.
    axis_name: inside ``jax.shard_map``, the mesh axis over which ``w``
      (and ``bias``) are split on ``V``; labels are global ids. Per-row max
      and sums combine with ``pmax``/``psum`` (a few ``(chunk,)``
      collectives per chunk, never an all-gather; differentiated class
      weights with smoothing add a ``(V,)`` psum), smoothing and z-loss
      run over the global vocabulary, and ``dx`` is summed over the axis.
      ``x`` and the labels must hold the same rows on every device of the
      axis (not checked: a value typed as varying may be replicated, as
      after ``lax.all_gather``). Gradients need ``check_vma=True``
      (shard_map's default; an error otherwise).
    batch_axis_name: inside ``jax.shard_map``, the mesh axis (or tuple of
      axes) splitting the batch: ``"mean"``/``"sum"`` then reduce over the
      global batch (the result is replicated) and ``dw`` is summed over
      it.
    return_aux: also return a :class:`LossAux` (per-row ``lse``,
      ``entropy``, ``argmax``, ``correct``), formed in the same pass over
      the chunks. When only the loss is differentiated the three-matmul
      path is kept; non-zero aux cotangents add one recomputing sweep.
    w_layout: ``"dv"`` (the default) or ``"vd"``: ``w`` is a ``(V, d)``
      tied embedding, the loss is that of ``x @ w.T`` and ``w``'s gradient
      comes out ``(V, d)``, neither transposed nor copied (beyond the
      half-precision layouts on CPU above). Passing
      ``emb.T`` as a ``(d, V)`` ``w`` gives the same values, but on XLA's
      CPU backend (whose matmuls take row-major operands) a loop over
      several chunks costs one transposed copy of ``w`` per call and one
      of its gradient.
    weights, temperature: as in :func:`cross_entropy` (per-row weights of
      the labels' shape; ``z / T``). Neither leaves the three-matmul path;
      their gradients come from the same pass.

  Returns:
    A scalar, or the per-row loss of the labels' shape for ``"none"``.
    Special values follow :func:`cross_entropy`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jax_softmax import cross_entropy, linear_cross_entropy
    >>> x = jax.random.normal(jax.random.key(0), (10, 4))
    >>> w = jax.random.normal(jax.random.key(1), (4, 50))
    >>> y = jnp.arange(10)
    >>> fused = linear_cross_entropy(x, w, y, chunk_size=4)
    >>> bool(jnp.allclose(fused, cross_entropy(x @ w, y)))
    True
  """
  _checks.check_reduction(reduction)
  _checks.check_grad_in_forward(grad_in_forward, reduction)
  return fused_call(
      "linear_cross_entropy", x, w, labels, reduction=reduction,
      chunk_size=chunk_size, w_layout=w_layout, bias=bias, where=where,
      ignore_index=ignore_index, axis_name=axis_name,
      batch_axis_name=batch_axis_name, grad_in_forward=grad_in_forward,
      return_aux=return_aux, hyper=(label_smoothing, z_loss, soft_cap,
                                    class_weights, temperature),
      weights=weights)


def fused_call(caller, x, w, labels, *, reduction, chunk_size, w_layout,
                bias, where, ignore_index, axis_name, batch_axis_name,
                grad_in_forward=None, return_aux=False, hyper, weights=None,
                objective=None, fn_args=()):
  """Validates the arguments of a fused loss and runs it on this device's
  rows, or on each device's rows of a batch on Explicit mesh axes."""
  chunk_size = _checks.check_chunk_size(chunk_size)
  x, w, vocab_major = _checks.linear_inputs(x, w, w_layout)
  vocab = w.shape[0] if vocab_major else w.shape[1]  # this device's slice
  global_vocab = vocab * _sharded.axis_size(axis_name, caller)
  _sharded.axis_size(batch_axis_name, caller)
  bias = _checks.bias(bias, vocab)
  batch_shape = x.shape[:-1]
  labels, row = _checks.int_label_rows(labels, batch_shape, where,
                                       ignore_index, global_vocab)
  dtype = compute_dtype(x.dtype)
  hp = make_hyper(*hyper[:4], global_vocab, dtype, hyper[4])
  rows = PerRow(_checks.row_weights(weights, batch_shape, dtype, flat=False),
                _checks.objective_args(fn_args, batch_shape, flat=False))
  if objective is not None:
    _checks.objective_closure(objective, rows.fn_args, batch_shape, dtype)
  cfg = Config(reduction, chunk_size or 0, grad_in_forward,
               matmul_policy(x.dtype, vocab_major), return_aux, axis_name,
               batch_axis_name, vocab_major=vocab_major,
               untyped_mesh=_sharded.check_mesh_axes(
                   axis_name, batch_axis_name, x, w, labels),
               objective=objective)
  lead = None
  if axis_name is None and batch_axis_name is None:
    lead = _sharded.explicit_batch_spec(x)
  if lead is None:
    return local_loss(cfg, x, w, bias, labels, row, hp, rows)
  if all(e is None for e in lead):  # Explicit axes, the batch not split
    return local_loss(cfg, *_sharded.replicated(
        (x, w, bias, labels, row, hp, rows)))
  # Explicit mesh axes shard the batch: each device runs the chunk loop on
  # its own rows, reductions psum over those axes.
  return _sharded.map_explicit_batch(
      lambda axes, *args: local_loss(cfg._replace(batch_axes=axes), *args),
      lead, x, w, bias, labels, row, hp, rows, per_row=reduction == "none",
      aux_type=LossAux, return_aux=return_aux)
