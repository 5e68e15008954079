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
  axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
  out = []
  for a in axes:
    if not isinstance(a, (int, np.integer)):
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


def check_labels(labels: jax.Array, num_classes: int,
                 ignore_index: int | None, checked: bool,
                 rows: jax.Array | None = None) -> None:
  """Raises ``ValueError`` for a label outside ``[0, num_classes)``.

  Rows where ``rows`` (a boolean row mask) is False are not checked: an
  uncounted row contributes nothing whatever it holds.

  Concrete labels are checked here with NumPy. Traced labels are checked only
  when ``checked`` is true, through ``checkify.check``: the caller then runs
  the function under ``jax.experimental.checkify.checkify`` and calls
  ``err.throw()``, which raises ``checkify.JaxRuntimeError`` (a
  ``ValueError``) with the same message.
  """
  bad_msg = ("label {label} at position {pos} is outside [0, "
             f"{num_classes})" + (f" and is not ignore_index={ignore_index}"
                                  if ignore_index is not None else ""))
  if not isinstance(labels, jax.core.Tracer) and not isinstance(
      rows, jax.core.Tracer):
    y = np.asarray(labels)
    bad = (y < 0) | (y >= num_classes)
    if ignore_index is not None:
      bad &= y != ignore_index
    if rows is not None:
      bad &= np.asarray(rows)
    if bad.any():
      pos = np.unravel_index(int(np.argmax(bad)), y.shape)
      raise ValueError(bad_msg.format(label=int(y[pos]), pos=tuple(
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


def check_integer_labels(labels: jax.Array, batch_shape: tuple[int, ...]
                         ) -> None:
  if labels.shape != batch_shape:
    raise ValueError(
        f"integer labels must have the logits' shape without the class axis, "
        f"{batch_shape}; got {labels.shape}."
    )


def check_class_weights(class_weights: jax.Array | None, num_classes: int
                        ) -> None:
  if class_weights is None:
    return
  if class_weights.shape != (num_classes,):
    raise ValueError(
        f"class_weights must have shape ({num_classes},); got "
        f"{class_weights.shape}."
    )


def row_mask(labels: jax.Array, where, ignore_index: int | None,
             num_classes: int) -> jax.Array:
  """The counted rows of integer ``labels``: ``where`` (a row mask of the
  labels' shape) and not ``ignore_index``; checks the concrete labels of
  those rows (:func:`check_labels`)."""
  row = jnp.ones(labels.shape, bool)
  if where is not None:
    row = broadcast_mask(as_bool_mask(where), labels.shape, "batch")
  if ignore_index is not None:
    row = row & (labels != ignore_index)
  check_labels(labels, num_classes, ignore_index, False,
               row if where is not None else None)
  return row
