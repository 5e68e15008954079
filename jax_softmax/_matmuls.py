"""The fused loss's matmuls, laid out as :class:`MatmulPolicy` says.

Every product takes the operands' dtype with float32 accumulation.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jax_softmax._numerics import MatmulPolicy, compute_dtype


class Weights(NamedTuple):
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


def operands(w, policy: MatmulPolicy, vocab_major: bool) -> Weights:
  """``w`` (``(V, d)`` if ``vocab_major``) as the policy's operands."""
  w = w.astype(compute_dtype(w.dtype) if policy.upcast else w.dtype)
  other = jnp.swapaxes(w, 0, 1) if policy.plain_w else None
  return Weights(other, w) if vocab_major else Weights(w, other)


def _dot(a, b, a_dim: int, b_dim: int):
  """``a . b`` contracting ``a_dim`` with ``b_dim``, float32 accumulated."""
  return lax.dot_general(a, b, (((a_dim,), (b_dim,)), ((), ())),
                         preferred_element_type=compute_dtype(a.dtype))


def logits(x_c, ws: Weights, bias):
  """``(c, V)`` float32 logits of one chunk (input dtype, f32 accumulate)."""
  z = _dot(x_c, ws.dv, 1, 0) if ws.dv is not None else _dot(x_c, ws.vd, 1, 1)
  return z if bias is None else z + bias.astype(z.dtype)[None, :]


def grad_dx(dz, ws: Weights):
  """``dx_c = dz w^T`` in float32, ``dz`` in the operands' dtype."""
  return _dot(dz, ws.vd, 1, 0) if ws.vd is not None else _dot(dz, ws.dv, 1, 1)


def grad_dw(rows, dz, keep, *, plain: bool, vocab_major: bool):
  """``dw`` of a block of rows in float32: ``x^T dz`` (``dz^T x`` when
  ``w`` is ``(V, d)`` and not ``plain``), ``dz`` in the operands' dtype.

  ``rows`` is the block's ``x^T`` as a ``(d, r)`` array when ``plain``:
  ``dw`` is then the plain ``(d, r) @ (r, V)`` product, ``(d, V)`` in both
  layouts (see :class:`MatmulPolicy`); else ``x`` itself, ``(r, d)``. Rows
  where ``keep`` is False (uncounted rows when only the loss is
  differentiated) may hold anything (NaN padding): they are zeroed so
  that ``0 * NaN`` cannot reach ``dw``.
  """
  if plain:
    if keep is not None:
      rows = jnp.where(keep[None, :], rows, 0)
    return _dot(rows, dz, 1, 0)
  if keep is not None:
    rows = jnp.where(keep[:, None], rows, 0)
  return _dot(dz, rows, 0, 0) if vocab_major else _dot(rows, dz, 0, 0)
