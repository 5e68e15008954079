"""The seed document's linear softmax classifier, exact and stable."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_softmax import _checks
from jax_softmax._hypergrad import grad_hyper
from jax_softmax._kernel import (
  Classes,
  grad_logits,
  make_hyper,
  row_stats,
)
from jax_softmax._numerics import compute_dtype
from jax_softmax._reduce import reduce_rows, row_cotangents


@jax.custom_vjp
def _linear_loss(w, x, y, row, reg, hp):
  return _linear_loss_fwd(w, x, y, row, reg, hp)[0]


def _linear_loss_fwd(w, x, y, row, reg, hp):
  z = jnp.matmul(x, w, preferred_element_type=compute_dtype(x.dtype))
  st = row_stats(z, y, row, None, hp, int_labels=True,
                 classes=Classes(z.shape[-1]))
  loss = reduce_rows(st, hp, "mean") + _penalty(w, reg)
  return loss, (w, x, z, y, reg, hp, st)


def _penalty(w, reg):
  """``reg * sum W**2`` as ``sign(reg) sum (sqrt|reg| W)**2``: ``reg = 0``
  gives 0 whatever ``W`` (``W**2`` overflows past ``|W| = 1.8e19``, and
  ``0 * inf`` was NaN), a tiny ``reg`` with a huge ``W`` the finite
  product (``1e-10 * 4e38 = 4e28``, not ``inf``)."""
  r = jnp.sqrt(jnp.abs(reg))
  return jnp.sign(reg) * jnp.sum(jnp.square(r * w.astype(reg.dtype)))


def _linear_loss_bwd(res, g):
  w, x, z, y, reg, hp, st = res
  cot = row_cotangents(st, "mean", g, int_labels=True)
  classes = Classes(z.shape[-1])
  dz = grad_logits(z, y, None, hp, st, cot, int_labels=True, classes=classes)
  f32 = dz.dtype
  # Uncounted rows may hold anything (NaN padding): keep them out of dW.
  x = jnp.where(st.counted[:, None], x, 0)
  dw = jnp.matmul(x.T, dz.astype(x.dtype), preferred_element_type=f32)
  dw = dw + 2 * g * reg * w
  dx = jnp.matmul(dz.astype(w.dtype), w.T, preferred_element_type=f32)
  dreg = (g * jnp.sum(w * w)).astype(reg.dtype)
  dhp = grad_hyper(z, y, None, hp, st, cot, int_labels=True,
                   classes=classes, dz=dz)
  return (dw.astype(w.dtype), dx.astype(x.dtype), None, None, dreg, dhp)


_linear_loss.defvjp(_linear_loss_fwd, _linear_loss_bwd)
_linear_loss_jit = jax.jit(_linear_loss)


def linear_softmax_loss(
    W: jax.typing.ArrayLike,  # noqa: N803 (the seed's names)
    X: jax.typing.ArrayLike,  # noqa: N803
    y: jax.typing.ArrayLike,
    reg: jax.typing.ArrayLike = 0.0,
    *,
    where: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = -100,
    class_weights: jax.typing.ArrayLike | None = None,
    label_smoothing: jax.typing.ArrayLike = 0.0,
) -> jax.Array:
  r"""Mean softmax cross-entropy of the linear model ``X @ W``, plus L2.

  .. math::
    L(W) = \frac{1}{n} \sum_i \big(\mathrm{lse}(x_i W) - (x_i W)_{y_i}\big)
      + \mathrm{reg} \sum W^2,
    \qquad
    \frac{\partial L}{\partial W} = \frac{1}{n} X^\top (P - Y)
      + 2\,\mathrm{reg}\, W

  with ``P = softmax(X W)`` row-wise and ``Y`` the one-hot labels. Each row
  is shifted by its own maximum, so unlike the seed's NumPy version (one
  global maximum) no row underflows to ``log(0)``. With ``where``,
  ``ignore_index``, ``class_weights`` or ``label_smoothing`` the data term is
  :func:`cross_entropy`'s ``"mean"`` (over counted rows).

  A ``jax.custom_vjp``: the forward pass computes ``X @ W`` once; the
  backward gives ``dW``, ``dX``, ``d reg = sum W**2`` and the
  hyperparameters' gradients. Second derivatives go through that
  backward: Hessians with ``jax.hessian`` or ``jax.jacrev(jax.grad(f))``,
  Hessian-vector products as grad of ``<grad f, v>`` or
  ``jax.jvp(jax.grad(f), ...)``; only a direct ``jax.jvp`` of the loss is
  not supported.

  Args:
    W: ``(d, c)`` weights (the seed's orientation).
    X: ``(n, d)`` features.
    y: ``(n,)`` integer labels in ``[0, c)``.
    reg: scalar L2 coefficient (may be traced; its gradient is exact).
    where: optional ``(n,)`` boolean row mask.
    ignore_index, class_weights, label_smoothing: as in
      :func:`cross_entropy`.

  Returns:
    The scalar loss, dtype ``result_type(W, float32)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jax_softmax import linear_softmax_loss
    >>> W = jnp.zeros((2, 3))
    >>> X = jnp.ones((4, 2))
    >>> linear_softmax_loss(W, X, jnp.array([0, 1, 2, 0]))  # log(3)
    Array(1.0986123, dtype=float32)
  """
  w, x, labels, row, r = _checked(W, X, y, reg, where, ignore_index)
  hp = make_hyper(label_smoothing, 0.0, None, class_weights,
                  w.shape[1], r.dtype)
  return _linear_loss_jit(w, x, labels, row, r, hp)


def _checked(W, X, y, reg, where, ignore_index  # noqa: N803
             ) -> tuple[jax.Array, ...]:
  """``(w, x, labels, row mask, reg)`` checked (shapes, dtypes, labels,
  a concrete ``reg`` finite) and in one floating dtype."""
  w = _checks.as_float_array(W, "W")
  x = _checks.as_float_array(X, "X")
  if w.ndim != 2 or x.ndim != 2 or x.shape[1] != w.shape[0]:
    raise ValueError(
        f"expected W of shape (d, c) and X of shape (n, d); got W {w.shape} "
        f"and X {x.shape}.")
  x = x.astype(jnp.result_type(x.dtype, w.dtype))
  w = w.astype(x.dtype)
  labels, row = _checks.int_label_rows(y, (x.shape[0],), where,
                                       ignore_index, w.shape[1], name="y")
  reg = _checks.scalar_param(reg, "reg", compute_dtype(w.dtype))
  return w, x, labels, row, reg


def softmax_with_gradients(
    W: jax.typing.ArrayLike,  # noqa: N803
    X: jax.typing.ArrayLike,  # noqa: N803
    y: jax.typing.ArrayLike,
    reg: jax.typing.ArrayLike,
) -> tuple[jax.Array, jax.Array]:
  """The seed's ``softmax_with_gradients(W, X, y, reg) -> (loss, dW)``.

  Same contract as the seed's NumPy function (``W`` ``(d, c)``, ``X``
  ``(b, d)``, ``y`` ``(b,)``), jitted and stable: ``loss`` is
  :func:`linear_softmax_loss` and ``dW = X^T (P - Y) / b + 2 reg W``.

  Args:
    W: ``(d, c)`` weights.
    X: ``(b, d)`` features.
    y: ``(b,)`` integer labels, every one in ``[0, c)`` (a concrete bad
      label raises ``ValueError``; there is no ``ignore_index``).
    reg: scalar L2 coefficient.

  Returns:
    ``(loss, dW)``: the scalar loss and its gradient, of ``W``'s shape.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jax_softmax import softmax_with_gradients
    >>> loss, dW = softmax_with_gradients(jnp.zeros((2, 2)), jnp.eye(2),
    ...                                   jnp.array([0, 1]), 0.1)
    >>> dW
    Array([[-0.25,  0.25],
           [ 0.25, -0.25]], dtype=float32)
  """
  # Checked as linear_softmax_loss checks them, here, outside the jitted
  # computation (concrete labels and reg; the seed's contract: every
  # label in [0, c), no ignore_index).
  _checked(W, X, y, reg, None, None)
  # An array W (a nested list would give dW as a list of the same shape).
  return _value_and_grad(jnp.asarray(W), X,
                         _checks.as_int_labels(y, "y")[0], reg)


_value_and_grad = jax.jit(jax.value_and_grad(
    lambda W, X, y, reg: linear_softmax_loss(W, X, y, reg,  # noqa: N803
                                             ignore_index=None)))

