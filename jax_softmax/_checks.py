"""Argument validation shared by every public function.

Every check runs at trace time on shapes and dtypes (static information), so
it costs nothing under ``jit``. The one value check, :func:`check_labels`,
inspects concrete labels eagerly and, on request, traced labels through
``jax.experimental.checkify``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from jax_softmax._numerics import (
  like_rows,
  merge_dims,
  padded_spec,
  sharded_like,
  unflatten_rows,
)

Axis = int | Sequence[int]


def as_float_array(x: jax.typing.ArrayLike, name: str) -> jax.Array:
  """Returns ``x`` as an array, raising ``TypeError`` unless it is floating."""
  arr = jnp.asarray(x)
  if not jnp.issubdtype(arr.dtype, jnp.floating):
    raise TypeError(
        f"{name} must have a floating dtype (float16, bfloat16, float32 or "
        f"float64); got {arr.dtype}."
    )
  return arr


def normalize_axes(axis: Axis | None, ndim: int, name: str = "axis"
                   ) -> tuple[int, ...]:
  """Returns non-negative axes in the given order (a tuple of class axes is
  flattened in that order, as optax does); ``None`` means all axes."""
  if axis is None:
    return tuple(range(ndim))
  try:
    axes = ((axis,) if isinstance(axis, (int, np.integer)) else
            tuple(axis))
  except TypeError:
    raise TypeError(
        f"{name} must be an int or a tuple of ints; got {axis!r}.") from None
  out = []
  for a in axes:
    if isinstance(a, (bool, np.bool_)) or not isinstance(a, (int,
                                                             np.integer)):
      raise TypeError(
          f"{name} must be an int or a tuple of ints; got {axis!r}.")
    if not -ndim <= a < ndim:
      raise ValueError(
          f"{name}={axis!r} is out of range for an array of rank {ndim} "
          f"(expected -{ndim} <= axis < {ndim})."
      )
    out.append(int(a) % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"{name}={axis!r} repeats an axis.")
  if not out:
    raise ValueError(f"{name}={axis!r} names no axis.")
  return tuple(out)


def as_bool_mask(where: jax.typing.ArrayLike, name: str = "where"
                 ) -> jax.Array:
  mask = jnp.asarray(where)
  if mask.dtype != jnp.bool_:
    raise TypeError(f"{name} must be a boolean array; got dtype {mask.dtype}.")
  return mask


def broadcast_mask(mask: jax.Array, shape: tuple[int, ...], what: str
                   ) -> jax.Array:
  """Broadcasts a boolean mask to ``shape`` or raises a ``ValueError``."""
  try:
    return jnp.broadcast_to(mask, shape)
  except ValueError:
    raise ValueError(
        f"where of shape {mask.shape} does not broadcast to the {what} "
        f"shape {shape}."
    ) from None


def check_reduction(reduction: str) -> None:
  if reduction not in ("mean", "sum", "none"):
    raise ValueError(
        f"reduction must be 'mean', 'sum' or 'none'; got {reduction!r}."
    )


def is_concrete(a) -> bool:
  """Whether ``a``'s values can be read here (not a tracer, not an array
  spread over other processes' devices)."""
  if isinstance(a, jax.core.Tracer):
    return False
  return not isinstance(a, jax.Array) or a.is_fully_addressable


_INT32 = np.iinfo(np.int32)


def dtype_of(a) -> np.dtype:
  """``a``'s dtype without converting it (a Python int list reads as
  NumPy does: int64 for big values, where ``jnp.asarray`` would wrap)."""
  return np.dtype(a.dtype if hasattr(a, "dtype") else np.asarray(a).dtype)


def _is_int(dtype) -> bool:
  return bool(jnp.issubdtype(dtype, jnp.integer)) and dtype != np.bool_


def as_int_labels(labels, name: str = "labels",
                  ignore_index: int | None = None
                  ) -> tuple[jax.Array, np.ndarray | None]:
  """Integer labels as ``int32``, and their exact values when concrete.

  Every integer dtype is accepted. The library compares labels with the
  class count and ``ignore_index`` only after this conversion, so a narrow
  dtype (uint8 labels with 256 classes, int8 with 200) never sees a class
  count cast into it. Values outside the int32 range (int64 or uint32
  labels) move to its nearest end, which keeps them out of range, or one
  short of an end that is ``ignore_index`` (a label of 2**33 must not
  become ``ignore_index=2**31 - 1``; a label equal to it stays ignored);
  concrete ones are also returned unclipped so that :func:`check_labels`
  reports them before anything is converted.

  Raises:
    TypeError: labels that are not integers.
  """
  dtype = dtype_of(labels)
  if not _is_int(dtype):
    raise TypeError(f"{name} must be integer class indices; got dtype "
                    f"{dtype}.")
  if is_concrete(labels):
    raw = np.asarray(labels)
    return jnp.asarray(_into_int32(np, raw, ignore_index)), raw
  if dtype.itemsize >= 4 and dtype != np.int32:
    labels = _into_int32(jnp, labels, ignore_index)
  return labels.astype(jnp.int32), None


def _into_int32(xnp, raw, ignore_index: int | None):
  """``raw`` as int32: only values beyond the int32 range move, to its
  nearest end, or one short of it where that end is ``ignore_index``."""
  hi = _INT32.max - (ignore_index == _INT32.max)
  out = xnp.where(raw > _INT32.max, hi, raw)
  if np.issubdtype(raw.dtype, np.signedinteger):
    lo = _INT32.min + (ignore_index == _INT32.min)
    out = xnp.where(raw < _INT32.min, lo, out)
  return out.astype(np.int32)


def _static_int(value, name: str, what: str) -> int:
  """A Python int (``TypeError`` naming ``name`` for anything else)."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (int, np.integer)):
    raise TypeError(f"{name} must be {what}; got {value!r}.")
  return int(value)


def check_ignore_index(ignore_index) -> int | None:
  """``ignore_index`` as a Python int (or None), or a clear error."""
  if ignore_index is None:
    return None
  ignore_index = _static_int(ignore_index, "ignore_index", "an int or None")
  if not _INT32.min <= ignore_index <= _INT32.max:
    raise ValueError("ignore_index must fit in int32; got "
                     f"{ignore_index}.")
  return ignore_index


def check_labels(labels: jax.Array, num_classes: int,
                 ignore_index: int | None, checked: bool,
                 rows: jax.Array | None = None,
                 raw: np.ndarray | None = None) -> None:
  """Raises ``ValueError`` for a label outside ``[0, num_classes)``.

  Rows where ``rows`` (a boolean row mask) is False are not checked: an
  uncounted row contributes nothing whatever it holds.

  Concrete labels (``raw``, the exact values of :func:`as_int_labels`) are
  checked here with NumPy. Traced labels are checked only when ``checked``
  is true, through ``checkify.check``: the caller then runs the function
  under ``jax.experimental.checkify.checkify`` and calls ``err.throw()``,
  which raises ``checkify.JaxRuntimeError`` (a ``ValueError``) with the
  same message.
  """
  bad_msg = ("label {label} at position {pos} is outside [0, "
             f"{num_classes})" + (f" and is not ignore_index={ignore_index}"
                                  if ignore_index is not None else ""))
  if raw is not None and (rows is None or is_concrete(rows)):
    bad = (raw < 0) | (raw >= num_classes)
    if ignore_index is not None:
      bad &= raw != ignore_index
    if rows is not None:
      bad &= np.asarray(rows)
    if bad.any():
      pos = np.unravel_index(int(np.argmax(bad)), raw.shape)
      raise ValueError(bad_msg.format(label=int(raw[pos]), pos=tuple(
          int(p) for p in pos)))
    return
  if not checked:
    return
  traced_bad = (labels < 0) | (labels >= num_classes)
  if ignore_index is not None:
    traced_bad &= labels != ignore_index
  if rows is not None:
    traced_bad &= rows
  flat = traced_bad.reshape(-1)
  first = jnp.argmax(flat)
  where = (jnp.stack(jnp.unravel_index(first, traced_bad.shape))
           if traced_bad.ndim else first)
  checkify.check(~jnp.any(flat), bad_msg, label=labels.reshape(-1)[first],
                 pos=where)


def int_label_rows(labels, batch_shape: tuple[int, ...], where,
                   ignore_index, num_classes: int, checked: bool = False,
                   has_class=None, name: str = "labels", batch_spec=None
                   ) -> tuple[jax.Array, jax.Array]:
  """Validates integer labels of the batch shape; returns them as int32
  with the row mask: ``where`` (a row mask broadcast to the batch shape)
  and not ``ignore_index``. Bad labels of counted rows (those also in
  ``has_class``, the rows a class mask leaves a class) raise
  (:func:`check_labels`)."""
  ignore_index = check_ignore_index(ignore_index)
  labels, raw = as_int_labels(labels, name, ignore_index)
  if labels.shape != batch_shape:
    raise ValueError(
        f"integer {name} must have the logits' shape without the class "
        f"axis, {batch_shape}; got {labels.shape}.")
  labels = like_rows(labels, batch_spec)
  row = like_rows(row_mask(where, batch_shape), batch_spec)
  if ignore_index is not None:
    row = row & (labels != ignore_index)
  counted = row if has_class is None else row & has_class
  check_labels(labels, num_classes, ignore_index, checked, counted, raw)
  return labels, row


def scalar_param(value, name: str, dtype, *, low: float = -np.inf,
                 high: float = np.inf, low_open: bool = False
                 ) -> jax.Array:
  """A real scalar hyperparameter as an array of ``dtype``.

  A concrete value must be finite and in ``[low, high]`` (``(low, high]``
  with ``low_open``); a traced one is only checked for shape and dtype.

  Raises:
    TypeError: not a real number (a string, a bool, a complex number).
    ValueError: not a scalar, or a concrete value out of range.
  """
  kind = dtype_of(value)
  if kind == np.bool_ or not (jnp.issubdtype(kind, jnp.integer)
                              or jnp.issubdtype(kind, jnp.floating)):
    raise TypeError(f"{name} must be a real number; got {value!r}.")
  arr = jnp.asarray(value, dtype=dtype)
  if arr.ndim:
    raise ValueError(f"{name} must be a scalar; got shape {arr.shape}.")
  if is_concrete(value):
    v = float(np.asarray(value))
    below = v <= low if low_open else v < low
    if not np.isfinite(v) or below or v > high:
      want = (f" and in [{low:g}, {high:g}]" if np.isfinite(high) else
              f" and {'>' if low_open else '>='} {low:g}"
              if np.isfinite(low) else "")
      raise ValueError(f"{name} must be finite{want}; got {v}.")
  return arr


def check_chunk_size(chunk_size) -> int | None:
  """``chunk_size``: None or a positive Python int (it fixes shapes)."""
  if chunk_size is None:
    return None
  chunk_size = _static_int(chunk_size, "chunk_size", "a positive int or "
                           "None (a static number of rows)")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be positive; got {chunk_size}.")
  return chunk_size


def label_kind(labels) -> bool:
  """Whether ``labels`` are integer class indices (else floating
  probabilities); ``TypeError`` for anything else (booleans included)."""
  dtype = dtype_of(labels)
  if _is_int(dtype):
    return True
  if jnp.issubdtype(dtype, jnp.floating):
    return False
  raise TypeError("labels must be integer class indices or floating "
                  f"probabilities; got dtype {dtype}.")


def row_mask(where, batch_shape: tuple[int, ...]) -> jax.Array:
  """A row mask of the batch shape: ``where`` broadcast (all True for
  None)."""
  if where is None:
    return jnp.ones(batch_shape, bool)
  return broadcast_mask(as_bool_mask(where), batch_shape, "batch")


def row_weights(weights, batch_shape: tuple[int, ...], dtype,
                flat: bool = True, batch_spec=None) -> jax.Array | None:
  """Per-row floating ``weights`` of the batch shape (flattened to rows
  with ``flat``, in ``batch_spec``: :func:`like_rows`), in ``dtype``
  (None for None)."""
  if weights is None:
    return None
  v = as_float_array(weights, "weights")
  if v.shape != batch_shape:
    raise ValueError(f"weights must have the labels' shape {batch_shape}; "
                     f"got {v.shape}.")
  v = v.astype(dtype)   # the loss keeps the logits' compute dtype
  return _as_rows(v, batch_shape, flat, batch_spec)


def objective_args(fn_args, batch_shape: tuple[int, ...], flat: bool = True,
                   batch_spec=None) -> tuple:
  """An objective's per-row arguments: a tuple of floating arrays whose
  leading dimensions are the batch shape (merged to rows with ``flat``, in
  ``batch_spec``, as :func:`row_weights`)."""
  if not isinstance(fn_args, (tuple, list)):
    raise TypeError("fn_args must be a tuple of per-row arrays; got "
                    f"{type(fn_args).__name__}.")
  out = []
  for i, a in enumerate(fn_args):
    a = as_float_array(a, f"fn_args[{i}]")
    if a.shape[:len(batch_shape)] != batch_shape:
      raise ValueError(f"fn_args[{i}] must have the labels' shape "
                       f"{batch_shape} as its leading dimensions; got "
                       f"{a.shape}.")
    out.append(_as_rows(a, batch_shape, flat, batch_spec))
  return tuple(out)


def _as_rows(a, batch_shape: tuple[int, ...], flat: bool, batch_spec):
  """A per-row array with its batch dimensions merged to rows (in
  ``batch_spec``: :func:`like_rows`) with ``flat``, else unchanged."""
  return flatten_rows(like_rows(a, batch_spec), len(batch_shape)) if flat else a


def objective_closure(fn, fn_args: tuple, batch_shape: tuple[int, ...],
                      dtype) -> None:
  """Raises if the fused objective ``fn`` closes over a traced value: the
  fused loss holds ``fn`` in its custom gradient, which cannot carry it
  (JAX's own error was an internal ``TypeError``)."""
  n = math.prod(batch_shape)
  rows = jax.ShapeDtypeStruct((n,), dtype)
  args = [jax.ShapeDtypeStruct((n,) + a.shape[len(batch_shape):], a.dtype)
          for a in fn_args]
  consts = jax.make_jaxpr(fn)(rows, rows, *args).consts
  if any(isinstance(c, jax.core.Tracer) for c in consts):
    raise ValueError(
        "the objective fn closes over a traced value (an array of an "
        "enclosing jax.jit, grad or vmap), which the fused objective's "
        "custom gradient cannot carry: pass it through fn_args as a "
        "per-row array, e.g. jnp.full(labels.shape, coef) (its gradient "
        "then comes from the same pass), or use log_prob_objective.")


def class_weights(weights, num_classes: int, dtype) -> jax.Array:
  """``(num_classes,)`` floating class weights, in ``dtype``."""
  cw = as_float_array(weights, "class_weights")
  if cw.shape != (num_classes,):
    raise ValueError(f"class_weights must have shape ({num_classes},); got "
                     f"{cw.shape}.")
  return cw.astype(dtype)   # the loss keeps the logits' compute dtype


def linear_inputs(x, w, w_layout: str, names: tuple[str, str] = ("x", "w")
                  ) -> tuple[jax.Array, jax.Array, bool]:
  """``(x, w, vocab_major)`` of a linear head: floating ``x`` ``(..., d)``
  and ``w`` ``(d, V)`` (``w_layout="dv"``) or ``(V, d)`` (``"vd"``,
  ``vocab_major``), both cast to their common dtype."""
  if w_layout not in ("dv", "vd"):
    raise ValueError(f"w_layout must be 'dv' or 'vd'; got {w_layout!r}.")
  vd = w_layout == "vd"
  x = as_float_array(x, names[0])
  w = as_float_array(w, names[1])

  def d_of(layout_vd: bool) -> int:
    return w.shape[1 if layout_vd else 0]

  if x.ndim < 1 or w.ndim != 2 or x.shape[-1] != d_of(vd):
    want = "(V, d) (w_layout='vd')" if vd else "(d, V)"
    hint = ""
    if w.ndim == 2 and x.ndim >= 1 and x.shape[-1] == d_of(not vd):
      hint = (" w looks like " + ("(d, V): pass w_layout='dv'" if vd else
              "a (V, d) embedding: pass w_layout='vd'") + ".")
    raise ValueError(f"expected {names[0]} of shape (..., d) and {names[1]} "
                     f"of shape {want}; got {names[0]} {x.shape} and "
                     f"{names[1]} {w.shape}.{hint}")
  dtype = jnp.result_type(x.dtype, w.dtype)
  return x.astype(dtype), w.astype(dtype), vd


def bias(b, vocab: int) -> jax.Array | None:
  """A floating ``(vocab,)`` bias, or None."""
  if b is None:
    return None
  b = as_float_array(b, "bias")
  if b.shape != (vocab,):
    raise ValueError(f"bias must have shape ({vocab},); got {b.shape}.")
  return b


def check_grad_in_forward(grad_in_forward, reduction: str) -> None:
  if grad_in_forward and reduction == "none":
    raise ValueError("grad_in_forward=True needs a scalar reduction ('mean' "
                     "or 'sum'); reduction='none' recomputes in backward.")


class LogitRows(NamedTuple):
  """Logits laid out as ``(rows, classes)`` with their masks and labels."""

  logits: jax.Array
  target: jax.Array
  row_mask: jax.Array
  class_mask: jax.Array | None
  batch_shape: tuple[int, ...]
  int_labels: bool
  batch_spec: tuple | None = None   # the batch's sharding (Explicit axes)


def logit_rows(logits, labels, axis, where, ignore_index, check_labels,
             name: str = "logits") -> LogitRows:
  """Validates and lays out the arguments of a loss from logits."""
  logits = as_float_array(logits, name)
  if logits.ndim == 0:
    raise ValueError(f"{name} must have at least one (class) axis; got a "
                     "scalar.")
  axes = normalize_axes(axis, logits.ndim)
  batch_axes = tuple(a for a in range(logits.ndim) if a not in axes)
  batch_shape = tuple(logits.shape[a] for a in batch_axes)
  num_classes = 1
  for a in axes:
    num_classes *= logits.shape[a]
  perm = batch_axes + axes
  spec = padded_spec(logits)
  batch_spec = None if spec is None else tuple(spec[a] for a in batch_axes)

  def class_layout(x):   # (rows, classes); rows explicit (0 classes)
    return merge_dims(jnp.transpose(x, perm),
                      (0, len(batch_axes), logits.ndim))

  int_labels = label_kind(labels)
  row, class_mask, row_where = None, None, where
  if where is not None and jnp.ndim(where) == logits.ndim:
    mask = sharded_like(broadcast_mask(as_bool_mask(where), logits.shape,
                                       name), logits)
    class_mask, row_where = class_layout(mask), None
  if int_labels:   # has_class: the rows with a class left
    has_class = None if class_mask is None else unflatten_rows(jnp.any(
        class_mask, axis=-1), batch_shape, batch_spec)
    labels, row = int_label_rows(
        labels, batch_shape, row_where, ignore_index, num_classes,
        check_labels, has_class, batch_spec=batch_spec)
    target = flatten_rows(labels)
  else:
    row = like_rows(row_mask(row_where, batch_shape), batch_spec)
    labels = jnp.asarray(labels)
    if labels.shape != logits.shape:
      raise ValueError(
          f"probability labels must have the logits' shape {logits.shape}; "
          f"got {labels.shape}.")
    target = class_layout(sharded_like(labels, logits))
  return LogitRows(class_layout(logits), target, flatten_rows(row),
                   class_mask, batch_shape, int_labels, batch_spec)


def flatten_rows(a, k: int | None = None):
  """A per-row array whose first ``k`` dimensions (all by default) are the
  batch shape, as ``(rows, ...)`` (:func:`merge_dims`)."""
  k = a.ndim if k is None else k
  return merge_dims(a, (0, k, *range(k + 1, a.ndim + 1)))
