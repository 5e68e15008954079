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


def grad_matmuls(x_c, xt_c, ws: Weights, dz, keep, *, need_dx: bool,
                 need_dw: bool, vocab_major: bool):
  """``dx_c = dz w^T`` and ``dw_c = x_c^T dz`` (``dz^T x_c`` when ``w`` is
  ``(V, d)`` and ``xt_c`` is None), accumulated and returned in float32;
  ``dz`` is rounded to the operands' dtype once, before both.

  ``xt_c``, when given, is ``x_c^T`` as a ``(d, c)`` array: ``dw_c`` is
  then the plain ``(d, c) @ (c, V)`` product, ``(d, V)`` in both layouts
  (see :class:`MatmulPolicy`). Rows where ``keep`` is False (uncounted
  rows when only the loss is differentiated) may hold anything (NaN
  padding): they are zeroed for ``dw`` so that ``0 * NaN`` cannot reach
  it.
  """
  dz = dz.astype(x_c.dtype)
  dx = dw = None
  if need_dx:
    dx = _dot(dz, ws.vd, 1, 0) if ws.vd is not None else _dot(dz, ws.dv, 1,
                                                              1)
  if need_dw:
    if xt_c is not None:
      if keep is not None:
        xt_c = jnp.where(keep[None, :], xt_c, 0)
      dw = _dot(xt_c, dz, 1, 0)
    else:
      if keep is not None:
        x_c = jnp.where(keep[:, None], x_c, 0)
      dw = _dot(dz, x_c, 0, 0) if vocab_major else _dot(x_c, dz, 0, 0)
  return dx, dw
