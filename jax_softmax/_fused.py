"""Fused linear cross-entropy: the loss of ``x @ w`` without the logits.

Rows are processed in chunks of ``c`` rows (``lax.scan``); a chunk's logits
``(c, V)`` live only inside one step. Chunks are strided (chunk ``j`` holds
rows ``j, j + n / c, ...``), so a batch split in blocks over devices by
``Auto`` mesh axes stays split inside every chunk. Two gradient strategies:

* **gradient in the forward pass** (scalar reductions): each step also forms
  ``g = d loss / d z`` for its chunk and does ``dx_c = g w^T`` and
  ``dw += x_c^T g`` (float32 accumulator). Residuals are ``dx``, ``dw``
  (and ``dbias``), kept in float32; the backward pass only scales them by
  the incoming cotangent and rounds each to its input's dtype once (a
  half-precision gradient under loss scaling is neither rounded twice nor
  flushed to 0). Three matmuls in all, the minimum.
* **recompute in the backward pass** (``reduction="none"``,
  ``grad_in_forward=False``, or differentiated hyperparameters): residuals
  are ``x``, ``w``, ``bias`` and per-row statistics (``lse`` and a few
  ``(b,)`` vectors); the backward recomputes each chunk's logits (four
  matmuls) and honours any per-row cotangent.

Inputs that are not differentiated are seen in the forward pass
(``symbolic_zeros=True``) and their gradient matmul is skipped. The row
math is ``_losses``' kernel, shared with :func:`cross_entropy`.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.sharding import PartitionSpec as P

from jax_softmax import _checks, _losses
from jax_softmax._primitives import compute_dtype

#: Bytes of chunk temporaries aimed at when ``chunk_size`` is None: a chunk
#: holds about three float32 ``(c, V)`` arrays (logits, exp, gradient).
CHUNK_BUDGET_BYTES = 128 * 2**20


#: Fewest rows per chunk when ``chunk_size`` is None: each chunk adds its
#: ``x_c^T g`` into the float32 ``dw`` (a read and a write of ``d * V``
#: floats), which dominates for small chunks. Measured on 2 CPU cores
#: (before ``dw``'s matmul took ``x`` transposed), time / three-matmul
#: floor at ``(1024, 1024, 128000)`` float32: 128 rows 1.17x, 256 rows
#: 1.07x, 512 rows 1.10x.
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


class _Cfg(NamedTuple):
  reduction: str
  chunk: int
  grad_in_forward: bool | None
  aux: bool = False
  axis_name: str | None = None     # mesh axis splitting the vocabulary
  batch_axis: str | tuple[str, ...] | None = None  # mesh axes of the batch
  varying: tuple[str, ...] = ()    # shard_map axes the inputs vary over
  w_vd: bool = False               # w given as (V, d)
  untyped: bool = False            # in shard_map with check_vma=False


def _vocab_size(cfg, w) -> int:
  return _dims(w, cfg.w_vd)[1]


def _dims(w, w_vd: bool) -> tuple[int, int]:
  """``(d, V)`` of ``w`` in either layout."""
  return w.shape[::-1] if w_vd else w.shape


def _vocab_shard(cfg, n_local: int) -> _losses.VocabShard | None:
  if cfg.axis_name is None:
    return None
  index = lax.axis_index(cfg.axis_name)
  return _losses.VocabShard(cfg.axis_name, index * n_local,
                            n_local * lax.axis_size(cfg.axis_name))


def _zeros(cfg, shape, dtype, axes=None):
  """Zeros typed as varying over ``axes`` (default: the inputs' mesh
  axes), for scan carries."""
  axes = cfg.varying if axes is None else axes
  z = jnp.zeros(shape, dtype)
  return lax.pcast(z, axes, to="varying") if axes else z


def _on_cpu() -> bool:
  """XLA's CPU backend, whose matmul quirks two choices below work around."""
  return jax.default_backend() == "cpu"


def _matmul_dtype(dtype):
  """The matmuls' operand dtype: the input's, except half precision on
  XLA's CPU backend, which has no half-precision matmul and would convert
  ``w`` to float32 once per dot (twice per chunk); there ``w`` is
  converted once per sweep instead (a float32 ``(d, V)`` temporary)."""
  return compute_dtype(dtype) if _on_cpu() else dtype


def _logits(cfg, x_c, w, bias):
  """``(c, V)`` float32 logits of one chunk (input dtype, f32 accumulate)."""
  z = lax.dot_general(x_c, w, (((1,), (int(cfg.w_vd),)), ((), ())),
                      preferred_element_type=compute_dtype(x_c.dtype))
  return z if bias is None else z + bias.astype(z.dtype)[None, :]


def _matmuls(cfg, x_c, xt_c, w, dz, keep, need_dx, need_dw):
  """``dx_c = dz w^T`` and ``dw_c = x_c^T dz`` (``dz^T x_c`` when ``w`` is
  ``(V, d)``), both accumulated and returned in float32.

  ``xt_c``, when given, is ``x_c^T`` as a ``(d, c)`` array: ``dw_c`` is
  then a plain ``(d, c) @ (c, V)`` product, which XLA's CPU backend runs
  through its fast (YNNPACK) path; the transposed-operand form
  ``x_c^T dz`` takes a slower kernel there (97 against 77 ms at
  ``(c, d, V) = (256, 512, 32000)``, measured).

  Rows where ``keep`` is False (uncounted rows when only the loss is
  differentiated) may hold anything (NaN padding): they are zeroed for
  ``dw`` so that ``0 * NaN`` cannot reach it.
  """
  f32 = dz.dtype
  dz = dz.astype(x_c.dtype)
  dx = dw = None
  if need_dx:
    dx = lax.dot_general(dz, w, (((1,), (1 - cfg.w_vd,)), ((), ())),
                         preferred_element_type=f32)
  if need_dw:
    xo, rows = (x_c, 0) if xt_c is None else (xt_c, 1)
    if keep is not None:
      xo = jnp.where(jnp.expand_dims(keep, 1 - rows), xo, 0)
    a, b, dims = ((dz, xo, ((0,), (rows,))) if cfg.w_vd
                  else (xo, dz, ((rows,), (0,))))
    dw = lax.dot_general(a, b, (dims, ((), ())), preferred_element_type=f32)
  return dx, dw


def _chunks(a, chunk):
  """``(n, ...) -> (n / chunk, chunk, ...)``, chunk ``j`` holding rows
  ``j, j + n / chunk, ...`` (strided): a batch split in blocks over
  devices then stays split inside every chunk (no all-gather)."""
  return jnp.swapaxes(a.reshape((chunk, -1) + a.shape[1:]), 0, 1)


def _flat(a):
  return jnp.swapaxes(a, 0, 1).reshape((-1,) + a.shape[2:])


def _add(acc, upd):
  return acc if upd is None else acc + upd


class _Need(NamedTuple):
  """Which gradients a sweep forms (the inputs that are perturbed)."""

  dx: bool = False
  dw: bool = False
  dbias: bool = False
  hyper: bool = False


def _sweep(cfg, x, w, bias, y, row, hp, need, st=None, aux=None, cot=None,
           aux_cot=(None, None)):
  """One pass over the row chunks: the single loop of this module.

  Without ``st`` it computes the per-row statistics (and the aux when
  ``cfg.aux``); with ``st`` (and ``aux``) given it reuses them. With
  per-row cotangents ``cot = (c_ce, c_z, mean_ce)`` and/or aux cotangents
  ``(g_lse, g_entropy)`` it forms each chunk's ``dz`` and the gradients in
  ``need``. Returns ``(st, aux, dx, dw, dbias, dhyper)``, None where not
  computed; the gradients are float32 (rounded to the inputs' dtypes
  once, by the caller, after any scaling by the output cotangent).
  """
  dtype = compute_dtype(x.dtype)
  g_lse, g_ent = aux_cot
  forms_dz = cot is not None or g_lse is not None or g_ent is not None
  mean_ce = None if cot is None else cot[2]
  shard = _vocab_shard(cfg, _vocab_size(cfg, w))
  # Mesh axes the rows vary over: hyperparameter gradients are psummed
  # over them (over the vocabulary axis inside grad_hyper).
  row_axes = tuple(a for a in cfg.varying if a != cfg.axis_name)
  w = w.astype(_matmul_dtype(w.dtype))

  def step(carry, inp):
    dw_acc, db_acc, dh_acc = carry
    (x_c, y_c, r_c, st_c, aux_c, cot_c, gl_c, ge_c), xt_c = inp
    x_c = x_c.astype(w.dtype)
    z = _logits(cfg, x_c, w, bias)
    out_st = out_aux = dx_c = None
    if st_c is None:
      # exp(z - m) is kept for this step's dz only (never a scan output).
      st_c = _losses.row_stats(z, y_c, r_c, None, hp, True, shard,
                               keep_exp=forms_dz)
      out_st = st_c._replace(exp=None)
      if cfg.aux:
        aux_c = out_aux = _losses.row_aux(z, y_c, st_c.counted, None, hp,
                                          True, shard)
    if forms_dz:
      dz = jnp.zeros(z.shape, dtype)
      if cot_c is not None:
        dz = dz + _losses.grad_logits(z, y_c, None, hp, True, st_c, *cot_c,
                                      shard)
      if gl_c is not None or ge_c is not None:
        dz = dz + _losses.grad_aux(z, None, hp, aux_c, gl_c, ge_c, shard)
      # Aux terms reach every row; the loss only counted ones.
      keep = st_c.counted if gl_c is None and ge_c is None else None
      dx_c, dw_c = _matmuls(cfg, x_c, xt_c, w, dz, keep, need.dx, need.dw)
      if need.dw:
        dw_acc = dw_acc + dw_c
      if need.dbias:
        db_acc = db_acc + jnp.sum(dz, axis=0)
      if need.hyper and cot_c is not None:
        dh = _losses.grad_hyper(z, y_c, None, hp, True, st_c, *cot_c,
                                mean_ce, shard)
        dh_acc = jax.tree.map(_add, dh_acc, dh)
    return (dw_acc, db_acc, dh_acc), (out_st, out_aux, dx_c)

  init = (_zeros(cfg, w.shape, dtype) if forms_dz and need.dw else None,
          _zeros(cfg, _vocab_size(cfg, w), dtype)
          if forms_dz and need.dbias else None,
          jax.tree.map(lambda a: _zeros(cfg, a.shape, a.dtype, row_axes), hp)
          if cot is not None and need.hyper else None)
  xs = (x, y, row, st, aux, None if cot is None else cot[:2], g_lse, g_ent)
  xs = jax.tree.map(lambda a: _chunks(a, cfg.chunk), xs)
  # On CPU, dw's matmul takes each chunk of x transposed: one (d, b) copy
  # of x per sweep (see _matmuls). The (V, d) layout's dz^T x_c could only
  # be made plain by transposing dz, a (c, V) copy per chunk: it is kept.
  xt = (jnp.swapaxes(xs[0], 1, 2).astype(w.dtype)
        if forms_dz and need.dw and _on_cpu() and not cfg.w_vd else None)
  (dw, db, dh), ys = lax.scan(step, init, (xs, xt))
  if dh is not None and row_axes:  # the rows' shares, summed over devices
    dh = jax.tree.map(lambda a: lax.psum(a, row_axes), dh)
  new_st, new_aux, dx = jax.tree.map(_flat, ys)
  return (st if st is not None else new_st,
          aux if aux is not None else new_aux, dx, dw, db, dh)


def _outputs(cfg, st, aux, hp):
  loss = _losses.reduce_rows(st, hp, cfg.reduction, cfg.batch_axis)
  return (loss, aux) if cfg.aux else loss


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(cfg, x, w, bias, y, row, hp):
  st, aux, *_ = _sweep(cfg, x, w, bias, y, row, hp, _Need())
  return _outputs(cfg, st, aux, hp)


def _fused_fwd(cfg, *args):
  (x, dx_on), (w, dw_on), (bias, db_on), (y, _), (row, _), (hp, hp_on) = (
      _losses.unwrap_primals(a) for a in args)
  need = _Need(dx_on, dw_on, db_on, hp_on)
  if cfg.untyped and any(need):
    raise ValueError(
        "gradients of linear_cross_entropy with axis_name/batch_axis_name "
        "need jax.shard_map(..., check_vma=True) (the default): with "
        "check_vma=False the partial gradients of each device would not be "
        "summed.")
  in_forward = (cfg.reduction != "none" and not hp_on
                and cfg.grad_in_forward is not False)
  grads = None
  if in_forward:
    # Per-row cotangents of a unit output cotangent need the mean's
    # denominators before the loop: a row is counted iff it is unmasked and
    # its support is non-empty, which only an all--inf bias can prevent.
    vocab = _vocab_size(cfg, w)
    shard = _vocab_shard(cfg, vocab)
    vocab = vocab if shard is None else shard.num_classes
    counted = row
    if bias is not None:
      nonempty = jnp.any(bias != -jnp.inf).astype(jnp.int32)
      if shard is not None:
        nonempty = lax.pmax(nonempty, shard.name)
      counted = row & (nonempty > 0)
    dtype = compute_dtype(x.dtype)
    w_y = _losses.label_weights(y, hp, vocab, dtype)
    zero = jnp.zeros(y.shape, dtype)
    pre = _losses.Stats(zero, zero, counted, jnp.where(counted, w_y, 0.0),
                        zero, zero, zero.astype(bool))
    cot = _losses.row_cotangents(pre, cfg.reduction, 1.0, True,
                                 cfg.batch_axis)
    st, aux, *grads = _sweep(cfg, x, w, bias, y, row, hp, need, cot=cot)
  else:
    st, aux, *_ = _sweep(cfg, x, w, bias, y, row, hp, _Need())
  # x, w, bias are inputs (no copy); kept for aux cotangents / recompute.
  return _outputs(cfg, st, aux, hp), (grads, (x, w, bias, y, row, hp, st,
                                              aux), need)


def _fused_bwd(cfg, res, g):
  grads, saved, need = res
  g, g_aux = g if cfg.aux else (g, None)
  if isinstance(g, SymbolicZero):
    g = jnp.zeros(g.shape, g.dtype)
  aux_cot = (None, None) if g_aux is None else _losses.aux_cotangents(g_aux)
  x, w, bias, y, row, hp, st, aux = saved
  out = [None] * 4
  cot = None
  if grads is None:
    cot = _losses.row_cotangents(st, cfg.reduction, g, True, cfg.batch_axis)
  if cot is not None or aux_cot != (None, None):
    out = list(_sweep(cfg, x, w, bias, y, row, hp, need, st, aux, cot,
                      aux_cot)[2:])
  if grads is not None:  # the loss's share was formed in the forward pass
    for i, a in enumerate(grads[:3]):
      if a is not None:
        out[i] = g * a if out[i] is None else out[i] + g * a
  # float32 until here: each gradient is rounded to its input's dtype once.
  dx, dw, db = (None if a is None else a.astype(p.dtype)
                for a, p in zip(out[:3], (x, w, bias), strict=True))
  return dx, dw, db, None, None, out[3]


_fused.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)
# Compiled once per configuration and shapes (eager calls stay fast).
_fused_jit = jax.jit(_fused, static_argnums=0)


def _varying(a) -> frozenset[str]:
  return frozenset(jax.typeof(a).manual_axis_type.varying)


def _mesh_typing(cfg, diff, other):
  """Inside ``shard_map``: casts the differentiable inputs to the union of
  all inputs' varying mesh axes (``lax.pcast``), so the transposes of those
  casts sum ``dx`` over the vocabulary axis and ``dw`` over the batch axis.
  (Hyperparameter gradients are psummed in :func:`_sweep`.) Gradients need
  ``check_vma=True`` (shard_map's default): without it nothing is typed
  and the partial gradients are not summed."""
  union: frozenset[str] = frozenset()
  for a in jax.tree.leaves((diff, other)):
    union |= _varying(a)
  if not union:
    return cfg, diff

  def cast(a):
    missing = tuple(sorted(union - _varying(a)))
    return lax.pcast(a, missing, to="varying") if missing else a

  return (cfg._replace(varying=tuple(sorted(union))),
          tuple(None if a is None else cast(a) for a in diff))


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
    batch_axis_name: str | None = None,
    return_aux: bool = False,
    w_layout: str = "dv",
) -> jax.Array | tuple[jax.Array, _losses.LossAux]:
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
  statistics, e.g. under remat), or differentiated hyperparameters, the
  backward pass recomputes the logits (four matmuls). A call that is not
  differentiated computes the loss only. A frozen ``x`` or ``w`` skips its
  gradient matmul.

  Memory: about ``3 * 4 * chunk * V`` bytes of chunk temporaries plus the
  float32 ``dw`` accumulator ``(d, V)`` and ``dx`` ``(b, d)`` (and, on
  XLA's CPU backend when a ``(d, V)`` ``w`` is differentiated, a
  transposed copy of ``x`` for ``dw``'s matmul); ``chunk_size=None`` picks
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
  (``preferred_element_type``); the softmax math, ``dw`` and ``dbias``
  accumulate in float32; gradients come back in their inputs' dtypes, the
  loss in ``result_type(x, float32)``. Exception: when the default backend
  is XLA's CPU, which has no half-precision matmul, half-precision
  operands are converted to float32 once per pass (one float32 copy of
  ``w``) and the matmuls run in float32 (so ``dz`` is not rounded to the
  input dtype there).

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
      Gradients need ``check_vma=True`` (shard_map's default; an error
      otherwise).
    batch_axis_name: inside ``jax.shard_map``, the mesh axis splitting the
      batch: ``"mean"``/``"sum"`` then reduce over the global batch (the
      result is replicated) and ``dw`` is summed over it.
    return_aux: also return a :class:`LossAux` (per-row ``lse``,
      ``entropy``, ``argmax``, ``correct``), formed in the same pass over
      the chunks. When only the loss is differentiated the three-matmul
      path is kept; non-zero aux cotangents add one recomputing sweep.
    w_layout: ``"dv"`` (the default) or ``"vd"``: ``w`` is a ``(V, d)``
      tied embedding, the loss is that of ``x @ w.T`` and ``w``'s gradient
      comes out ``(V, d)``, neither transposed nor copied (beyond the
      half-precision conversion on CPU above). Passing
      ``emb.T`` as a ``(d, V)`` ``w`` gives the same values, but on XLA's
      CPU backend (whose matmuls take row-major operands) a loop over
      several chunks costs one transposed copy of ``w`` per call and one
      of its gradient.

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
  if w_layout not in ("dv", "vd"):
    raise ValueError(f"w_layout must be 'dv' or 'vd'; got {w_layout!r}.")
  w_vd = w_layout == "vd"
  chunk_size = _checks.check_chunk_size(chunk_size)
  if grad_in_forward and reduction == "none":
    raise ValueError("grad_in_forward=True needs a scalar reduction ('mean' "
                     "or 'sum'); reduction='none' recomputes in backward.")
  x = _checks.as_float_array(x, "x")
  w = _checks.as_float_array(w, "w")
  if x.ndim < 1 or w.ndim != 2 or x.shape[-1] != _dims(w, w_vd)[0]:
    want = "(V, d) (w_layout='vd')" if w_vd else "(d, V)"
    hint = ""
    if w.ndim == 2 and x.ndim >= 1 and x.shape[-1] == _dims(w, not w_vd)[0]:
      hint = (" w looks like " + ("(d, V): pass w_layout='dv'" if w_vd else
              "a (V, d) embedding: pass w_layout='vd'") + ".")
    raise ValueError(f"expected x of shape (..., d) and w of shape {want}; "
                     f"got x {x.shape} and w {w.shape}.{hint}")
  dtype = jnp.result_type(x.dtype, w.dtype)
  x, w = x.astype(dtype), w.astype(dtype)
  batch_shape = x.shape[:-1]
  vocab = _dims(w, w_vd)[1]  # this device's slice with axis_name, global below
  global_vocab = vocab
  for name in (axis_name, batch_axis_name):
    try:
      size = 1 if name is None else lax.axis_size(name)
    except NameError:
      raise ValueError(
          f"mesh axis {name!r} is not bound: call linear_cross_entropy with "
          "axis_name / batch_axis_name inside jax.shard_map over a mesh "
          "with that axis.") from None
    if name == axis_name:
      global_vocab *= size
  if bias is not None:
    bias = _checks.as_float_array(bias, "bias")
    if bias.shape != (vocab,):
      raise ValueError(f"bias must have shape ({vocab},); got {bias.shape}.")
  labels, row = _checks.int_label_rows(labels, batch_shape, where,
                                       ignore_index, global_vocab)
  hp = _losses.make_hyper(label_smoothing, z_loss, soft_cap, class_weights,
                          global_vocab, compute_dtype(dtype))
  cfg = _Cfg(reduction, chunk_size or 0, grad_in_forward, return_aux,
             axis_name, batch_axis_name, w_vd=w_vd,
             untyped=_check_mesh_axes(axis_name, batch_axis_name, x, w,
                                      labels))
  lead = None
  if axis_name is None and batch_axis_name is None:
    lead = _explicit_batch_spec(x, w, bias)
  if lead is None:
    return _local_loss(cfg, x, w, bias, labels, row, hp)
  # Explicit mesh axes shard the batch: each device runs the chunk loop on
  # its own rows, reductions psum over those axes (no all-gather of x).
  axes = tuple(a for entry in lead if entry is not None
               for a in ((entry,) if isinstance(entry, str) else entry))
  rows = P(*lead)
  per_row = P() if reduction != "none" else rows
  aux_specs = _losses.LossAux(*[rows] * 4)  # type: ignore[arg-type]
  out_specs = (per_row, aux_specs) if return_aux else per_row
  local = jax.shard_map(
      functools.partial(_local_loss, cfg._replace(batch_axis=axes)),
      mesh=jax.typeof(x).sharding.mesh,
      in_specs=(P(*lead, None), P(), P(), rows, rows, P()),
      out_specs=out_specs)
  return local(x, w, bias, jax.reshard(labels, rows), jax.reshard(row, rows),
               hp)


def _check_mesh_axes(axis_name, batch_axis_name, x, w, labels) -> bool:
  """Inside ``shard_map``: that ``w`` varies over ``axis_name`` and the
  rows over ``batch_axis_name`` (else values would be wrong). Returns True
  when nothing is typed (``check_vma=False``): values are right there, but
  gradients are refused."""
  name = axis_name if axis_name is not None else batch_axis_name
  if name not in jax.sharding.get_abstract_mesh().manual_axes:
    return False  # no shard_map axis (None, or e.g. vmap's axis_name)
  probe = lax.pcast(jnp.zeros(()), (name,), to="varying")
  if name not in _varying(probe):  # shard_map(..., check_vma=False)
    return True
  if axis_name is not None and axis_name not in _varying(w):
    raise ValueError(
        f"axis_name={axis_name!r}: w must be split on V over that mesh axis "
        f"(shard_map in_specs P(None, {axis_name!r}), or "
        f"P({axis_name!r}, None) with w_layout='vd').")
  if (batch_axis_name is not None
      and batch_axis_name not in _varying(x) | _varying(labels)):
    raise ValueError(
        f"batch_axis_name={batch_axis_name!r}: x and labels must be split "
        f"on the batch over that mesh axis (shard_map in_specs "
        f"P({batch_axis_name!r})).")
  return False


def _explicit_batch_spec(x, w, bias):
  """The batch dims' spec when Explicit mesh axes shard ``x``'s batch and
  ``w``/``bias`` are replicated, else None."""
  spec = tuple(jax.typeof(x).sharding.spec)
  spec += (None,) * (x.ndim - len(spec))
  lead = spec[:-1]
  replicated = all(all(e is None for e in jax.typeof(a).sharding.spec)
                   for a in (w, bias) if a is not None)
  if spec[-1] is None and replicated and any(e is not None for e in lead):
    return lead
  return None


def _local_loss(cfg, x, w, bias, labels, row, hp):
  """The fused loss over this device's rows (all rows off a mesh)."""
  batch_shape = x.shape[:-1]
  n = math.prod(batch_shape)
  x2, y2, row2 = (x.reshape(n, x.shape[-1]), labels.reshape(n),
                 row.reshape(n))
  # A chunk larger than the batch would only pad it: clamp it.
  chunk = min(cfg.chunk or default_chunk_size(n, _vocab_size(cfg, w)),
              max(n, 1))
  pad = -n % chunk
  if pad:
    x2 = jnp.pad(x2, ((0, pad), (0, 0)))
    y2 = jnp.pad(y2, (0, pad))
    row2 = jnp.pad(row2, (0, pad))
  cfg = cfg._replace(chunk=chunk)
  if cfg.axis_name is not None or cfg.batch_axis is not None:
    cfg, (x2, w, bias) = _mesh_typing(cfg, (x2, w, bias), (y2, row2, hp))
  out = _fused_jit(cfg, x2, w, bias, y2, row2, hp)
  return _losses.shape_outputs(out, cfg.reduction, cfg.aux, batch_shape)
