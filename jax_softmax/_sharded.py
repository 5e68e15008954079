"""Everything that knows about a device mesh; no other module calls a
collective.

* :class:`ShardedClasses`: a class axis split over a mesh axis (the
  vocabulary-parallel fused loss): maxima and sums over classes become
  ``pmax`` / ``psum``.
* :func:`batch_sum`: sums over rows split over mesh axes (data parallel).
* Mesh typing inside ``shard_map`` (:func:`mesh_typing`, ``lax.pcast``),
  the checks of ``axis_name`` / ``batch_axis_name``
  (:func:`check_mesh_axes`), and the dispatch of a batch sharded over
  ``Explicit`` mesh axes (:func:`explicit_batch_spec`,
  :func:`map_explicit_batch`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jax_softmax._kernel import Classes, Hyper

BatchAxes = str | tuple[str, ...] | None


class ShardedClasses(Classes):
  """This device's slice of a class axis split over the mesh axis
  ``name`` (inside ``shard_map``): labels are global ids, ``offset`` the
  first id held here."""

  def __init__(self, name: str, n_local: int):
    super().__init__(n_local)
    self.name = name
    self.offset = lax.axis_index(name) * n_local
    self.num_classes = n_local * lax.axis_size(name)

  def max(self, x):
    # pmax may skip NaN (XLA:CPU's does: a row of NaN logits on every shard
    # came out -inf, and was dropped as empty). +inf stands for a NaN: the
    # row is poisoned alike, and every result is invariant to the shift.
    local = super().max(x)
    if jnp.issubdtype(local.dtype, jnp.floating):
      local = jnp.where(jnp.isnan(local), jnp.inf, local)
    return lax.pmax(local, self.name)

  def sum(self, x):
    return lax.psum(jnp.sum(x, axis=-1), self.name)

  def total(self, x):
    return lax.psum(x, self.name)

  def weights(self, hp: Hyper) -> Hyper:
    if hp.class_weights is None:
      return hp
    return hp._replace(class_weights=lax.dynamic_slice_in_dim(
        hp.class_weights, self.offset, self.n_local))

  def scatter(self, d_local):
    full = jnp.zeros((self.num_classes,), d_local.dtype)
    return lax.psum(lax.dynamic_update_slice_in_dim(full, d_local,
                                                    self.offset, 0),
                    self.name)

  def argmax(self, raw):
    # The first global maximum, ties to the lowest id; a NaN beats any
    # number (jnp.argmax's order), so the first NaN where there is one.
    # One pmax of (has a NaN, best number); pmax alone may skip NaN.
    best = jnp.max(raw, axis=-1)
    nan = jnp.isnan(best)
    has_nan, top = lax.pmax(jnp.stack(
        [nan.astype(best.dtype), jnp.where(nan, -jnp.inf, best)]), self.name)
    here = jnp.where(has_nan > 0, nan, best == top)
    return lax.pmin(jnp.where(here, jnp.argmax(raw, axis=-1) + self.offset,
                              self.num_classes), self.name)


def classes_of(n_local: int, axis_name: str | None) -> Classes:
  """The class axis of a ``(rows, n_local)`` block: whole, or split over
  the mesh axis ``axis_name``."""
  if axis_name is None:
    return Classes(n_local)
  return ShardedClasses(axis_name, n_local)


def batch_sum(x, batch_axes: BatchAxes):
  """Sum over rows, and over the mesh axes ``batch_axes`` if given."""
  s = jnp.sum(x)
  return s if batch_axes is None else lax.psum(s, batch_axes)


def sum_over(tree, axes: tuple[str, ...]):
  """Each leaf summed over the mesh ``axes`` (none: unchanged)."""
  if not axes:
    return tree
  return jax.tree.map(lambda a: lax.psum(a, axes), tree)


def varying_zeros(shape, dtype, axes: tuple[str, ...]):
  """Zeros typed as varying over the mesh ``axes`` (for scan carries)."""
  z = jnp.zeros(shape, dtype)
  return lax.pcast(z, axes, to="varying") if axes else z


def _varying(a) -> frozenset[str]:
  return frozenset(jax.typeof(a).manual_axis_type.varying)


def mesh_typing(diff, other) -> tuple[tuple[str, ...], tuple]:
  """Inside ``shard_map``: casts the differentiable inputs ``diff`` to the
  union of all inputs' varying mesh axes (``lax.pcast``), so that the
  transposes of those casts sum ``dx`` over the vocabulary axis and ``dw``
  over the batch axis. Returns ``(axes, cast diff)``. Gradients need
  ``check_vma=True`` (shard_map's default): without it nothing is typed
  and the partial gradients are not summed."""
  union: frozenset[str] = frozenset()
  for a in jax.tree.leaves((diff, other)):
    union |= _varying(a)

  def cast(a):
    missing = tuple(sorted(union - _varying(a)))
    return lax.pcast(a, missing, to="varying") if missing else a

  return tuple(sorted(union)), tuple(jax.tree.map(cast, a) for a in diff)


def axis_size(name: str | None, caller: str) -> int:
  """The size of the bound mesh axis ``name`` (1 for None)."""
  if name is None:
    return 1
  try:
    return lax.axis_size(name)
  except NameError:
    raise ValueError(
        f"mesh axis {name!r} is not bound: call {caller} with axis_name / "
        "batch_axis_name inside jax.shard_map over a mesh with that axis."
    ) from None


def check_mesh_axes(axis_name, batch_axis_name, x, w, labels) -> bool:
  """Inside ``shard_map``: that ``w`` varies over ``axis_name`` and the
  rows over ``batch_axis_name`` (else values would be wrong). Returns True
  when nothing is typed (``check_vma=False``): values are right there, but
  gradients are refused."""
  batch = (() if batch_axis_name is None else (batch_axis_name,)
           if isinstance(batch_axis_name, str) else tuple(batch_axis_name))
  names = batch if axis_name is None else (axis_name, *batch)
  manual = jax.sharding.get_abstract_mesh().manual_axes
  if not names or any(n not in manual for n in names):
    return False  # no shard_map axis (None, or e.g. vmap's axis_name)
  probe = lax.pcast(jnp.zeros(()), names, to="varying")
  if not set(names) <= _varying(probe):  # shard_map(..., check_vma=False)
    return True
  if axis_name is not None and axis_name not in _varying(w):
    raise ValueError(
        f"axis_name={axis_name!r}: w must be split on V over that mesh axis "
        f"(shard_map in_specs P(None, {axis_name!r}), or "
        f"P({axis_name!r}, None) with w_layout='vd').")
  if not set(batch) <= _varying(x) | _varying(labels):
    raise ValueError(
        f"batch_axis_name={batch_axis_name!r}: x and labels must be split "
        f"on the batch over that mesh axis (shard_map in_specs "
        f"P({batch_axis_name!r})).")
  return False


def explicit_batch_spec(x):
  """On a mesh with Explicit axes (``jax.set_mesh``, no ``shard_map``):
  the spec of ``x``'s batch dims (all None when the batch is not split);
  None on other meshes and off any mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if jax.sharding.AxisType.Explicit not in mesh.axis_types:
    return None
  spec = tuple(jax.typeof(x).sharding.spec)
  return (spec + (None,) * (x.ndim - len(spec)))[:-1]


def replicated(tree):
  """Every array of ``tree`` resharded to replicated (Explicit axes)."""
  return jax.tree.map(lambda a: jax.reshard(a, P()), tree)


def map_explicit_batch(local: Callable, lead, x, w, bias, labels, row, hp,
                       per_row_inputs, *, per_row: bool, aux_type,
                       return_aux: bool):
  """Runs ``local(batch_axes, x, w, bias, labels, row, hp,
  per_row_inputs)`` on each device's rows of a batch sharded as ``lead``
  over Explicit mesh axes (``shard_map``; no all-gather of ``x``):
  ``local`` reduces over the returned ``batch_axes``. ``per_row_inputs``
  is a pytree of arrays of the batch shape (and trailing dims); ``per_row``:
  the loss has the batch shape. The other inputs are resharded to that
  layout: ``w``, ``bias`` and ``hp`` replicated (a ``w`` split over the
  vocabulary is gathered), the per-row ones split as the batch."""
  axes = tuple(a for entry in lead if entry is not None
               for a in ((entry,) if isinstance(entry, str) else entry))
  rows = P(*lead)
  loss_spec = rows if per_row else P()
  out_specs = ((loss_spec, aux_type(*[rows] * 4)) if return_aux
               else loss_spec)
  mapped = jax.shard_map(
      lambda *args: local(axes, *args), mesh=jax.typeof(x).sharding.mesh,
      in_specs=(P(*lead, None), P(), P(), rows, rows, P(), rows),
      out_specs=out_specs)
  return mapped(jax.reshard(x, P(*lead, None)), *replicated((w, bias)),
                jax.reshard(labels, rows), jax.reshard(row, rows),
                replicated(hp),
                jax.tree.map(lambda a: jax.reshard(a, rows), per_row_inputs))
