"""Argument validation shared by every public function.

Every check runs at trace time on shapes and dtypes (static information), so
it costs nothing under ``jit``. The one value check, :func:`check_labels`,
inspects concrete labels eagerly and, on request, traced labels through
``jax.experimental.checkify``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

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


def as_int_labels(labels, name: str = "labels"
                  ) -> tuple[jax.Array, np.ndarray | None]:
  """Integer labels as ``int32``, and their exact values when concrete.

  Every integer dtype is accepted. The library compares labels with the
  class count and ``ignore_index`` only after this conversion, so a narrow
  dtype (uint8 labels with 256 classes, int8 with 200) never sees a class
  count cast into it. Values outside the int32 range (int64 or uint32
  labels) are clipped to it, which keeps them out of range (and distinct
  from any ``ignore_index``); concrete ones are also returned unclipped so
  that :func:`check_labels` reports them before anything is converted.

  Raises:
    TypeError: labels that are not integers.
  """
  dtype = dtype_of(labels)
  if not jnp.issubdtype(dtype, jnp.integer) or dtype == np.bool_:
    raise TypeError(f"{name} must be integer class indices; got dtype "
                    f"{dtype}.")
  if is_concrete(labels):
    raw = np.asarray(labels)
    return jnp.asarray(np.clip(raw, _INT32.min, _INT32.max).astype(
        np.int32)), raw
  if dtype.itemsize >= 4 and dtype != np.int32:
    lo = _INT32.min if jnp.issubdtype(dtype, jnp.signedinteger) else 0
    labels = jnp.clip(labels, lo, _INT32.max)
  return labels.astype(jnp.int32), None


def check_ignore_index(ignore_index) -> int | None:
  """``ignore_index`` as a Python int (or None), or a clear error."""
  if ignore_index is None:
    return None
  if isinstance(ignore_index, (bool, np.bool_)) or not isinstance(
      ignore_index, (int, np.integer)):
    raise TypeError("ignore_index must be an int or None; got "
                    f"{ignore_index!r}.")
  if not _INT32.min <= ignore_index <= _INT32.max:
    raise ValueError("ignore_index must fit in int32; got "
                     f"{ignore_index}.")
  return int(ignore_index)


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
                   has_class=None, name: str = "labels"
                   ) -> tuple[jax.Array, jax.Array]:
  """Validates integer labels of the batch shape; returns them as int32
  with the row mask: ``where`` (a row mask broadcast to the batch shape)
  and not ``ignore_index``. Bad labels of counted rows (those also in
  ``has_class``, the rows a class mask leaves a class) raise
  (:func:`check_labels`)."""
  labels, raw = as_int_labels(labels, name)
  if labels.shape != batch_shape:
    raise ValueError(
        f"integer {name} must have the logits' shape without the class "
        f"axis, {batch_shape}; got {labels.shape}.")
  ignore_index = check_ignore_index(ignore_index)
  row = jnp.ones(batch_shape, bool)
  if where is not None:
    row = broadcast_mask(as_bool_mask(where), batch_shape, "batch")
  if ignore_index is not None:
    row = row & (labels != ignore_index)
  counted = row if has_class is None else row & has_class
  check_labels(labels, num_classes, ignore_index, checked, counted, raw)
  return labels, row


def check_class_weights(class_weights: jax.Array | None, num_classes: int
                        ) -> None:
  if class_weights is None:
    return
  if class_weights.shape != (num_classes,):
    raise ValueError(
        f"class_weights must have shape ({num_classes},); got "
        f"{class_weights.shape}."
    )


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
      want = (f"in [{low:g}, {high:g}]" if np.isfinite(high) else
              f"{'>' if low_open else '>='} {low:g}")
      raise ValueError(f"{name} must be finite and {want}; got {v}.")
  return arr


def check_chunk_size(chunk_size) -> int | None:
  """``chunk_size``: None or a positive Python int (it fixes shapes)."""
  if chunk_size is None:
    return None
  if isinstance(chunk_size, (bool, np.bool_)) or not isinstance(
      chunk_size, (int, np.integer)):
    raise TypeError("chunk_size must be a positive int or None (a static "
                    f"number of rows); got {chunk_size!r}.")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be positive; got {chunk_size}.")
  return int(chunk_size)
