"""The numerics policy shared by every function of the package.

* :func:`compute_dtype`: half-precision inputs are computed in float32.
* :func:`shift_exp`: the one stable exponential, ``exp(x - m)`` with ``m``
  the slice maximum (0 where that is not finite).
* :func:`mul0`, :func:`clean_rows`, :func:`soft_cap`: the special-value
  rules (``0 * inf = 0`` for a zero coefficient, uncounted rows hold 0,
  ``-inf`` stays ``-inf`` under the cap).
* :class:`MatmulPolicy`: what the backend's matmuls want (operand dtype,
  plain row-major products), one explicit object that tests can set;
  on the CPU it depends on the host's bfloat16 instructions
  (:func:`cpu_flags`).
* :func:`explicit_spec`, :func:`sharded_like`, :func:`rows_sharding`,
  :func:`merge_dims`, :func:`unflatten_rows`: the shardings that JAX
  cannot infer on a mesh with Explicit axes (a cotangent's, a gather's, a
  reshape's).
"""

from __future__ import annotations

import functools
import itertools
import math
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

NEG_INF = -jnp.inf


def compute_dtype(dtype) -> jnp.dtype:
  """float32 for half-precision inputs, else the input's dtype."""
  return jnp.result_type(dtype, jnp.float32)


def shift_exp(x: jax.Array, top: jax.Array
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(m, x - m, exp(x - m))`` for the slice maximum ``top``.

  ``top`` must broadcast against ``x`` (kept dimensions). ``m`` is ``top``
  where it is finite and 0 elsewhere: an empty slice (``top = -inf``) gives
  ``exp = 0`` without forming ``-inf - -inf``, and a slice holding NaN or
  ``+inf`` keeps it in ``x - m`` (its sums are NaN or ``+inf``). Every
  result built from ``x - m`` and a log of its sum is invariant to ``m``,
  so ``m`` carries no gradient (differentiated twice in reverse mode, the
  max's backward would turn a zero cotangent into NaN on a NaN row).
  """
  top = lax.stop_gradient(top)
  m = jnp.where(jnp.isfinite(top), top, 0.0)
  shifted = x - m
  return m, shifted, jnp.exp(shifted)


def log_of_sum(k, r):
  """``log(k + r)`` for ``k`` the terms at the maximum (1 each, times any
  weight) and ``r`` the others: ``log k + log1p(r / k)``, which keeps a
  tiny ``r`` (``log(1 + 2e-9)`` rounds to 0 in float32), where ``k > 0``
  and ``k + r > 0``; ``log(k + r)`` elsewhere (``log|k + r|`` is the
  caller's for signed sums)."""
  ok = (k > 0) & (r > -k)
  k_ok = jnp.where(ok, k, 1.0)
  return jnp.where(ok, jnp.log(k_ok) + jnp.log1p(jnp.where(ok, r, 0.0) / k_ok),
                   jnp.log(jnp.abs(k + r)))


def mul0(a, b):
  """``a * b`` with ``0 * +-inf = 0``: a term whose coefficient is 0 drops
  out of the loss even where ``b = -log p`` is ``+inf`` (a masked target
  under ``label_smoothing=1`` or a zero class weight), as in the formulas.
  NaN stays NaN. Written as a product so that its derivative in ``a`` is
  ``b`` (second-order gradients through targets)."""
  return a * jnp.where((a == 0) & jnp.isinf(b), 0.0, b)


def clean_rows(a, counted):
  """``a`` with the rows that are not counted set to 0: what an uncounted
  row holds (NaN, inf) never reaches a sum, nor a gradient through one."""
  return jnp.where(counted.reshape(counted.shape + (1,) * (a.ndim - 1)), a,
                   0)


def soft_cap(z, cap):
  """``cap * tanh(z / cap)``, ``-inf`` kept. Where ``|z / cap| < 2**-12``
  that equals ``z`` to within half an ulp (``tanh u = u (1 - u**2 / 3 +
  ...)``), and ``z`` itself is returned: a huge cap (``1e38``, where
  ``z / cap`` underflows) is no cap.

  """
  u = div_scalar(z, cap)
  capped = jnp.where(jnp.abs(u) < 2.0**-12, z, cap * jnp.tanh(u))
  return jnp.where(z == NEG_INF, NEG_INF, capped)


def div_scalar(z, cap):
  """``z / cap`` for a positive scalar ``cap`` (a soft cap, a temperature),
  also for a huge one. XLA's CPU
  backend divides by a scalar through its reciprocal, and ``1 / 1e38`` is
  subnormal (flushed to 0): a cap above ``2**64`` divides as
  ``(z 2**-64) / (cap 2**-64)`` instead (exact scalings; the barrier keeps
  XLA from folding the two scalars into that subnormal reciprocal)."""
  s = jnp.where(cap > 2.0**64, 2.0**-64, 1.0).astype(cap.dtype)
  s, scaled_cap = lax.optimization_barrier((s, cap * s))
  return (z * s) / scaled_cap


class MatmulPolicy(NamedTuple):
  """How the fused loss lays out its matmuls for a backend, dtype and
  layout of ``w``. Every product accumulates in float32.

  Attributes:
    upcast: run the matmuls in float32, converting half-precision operands
      once per pass (one float32 copy of ``w``), instead of in the input
      dtype.
    plain_dw: materialise ``x^T`` (a ``(d, b)`` copy per pass) so that
      ``dw``'s matmul is the plain row-major ``x_c^T @ dz``; a ``(V, d)``
      ``w``'s gradient then accumulates as ``(d, V)`` and is transposed
      once at the end.
    plain_w: materialise ``w`` in its other layout once per pass, so that
      the logits ``x_c @ w`` and ``dx_c = dz @ w^T`` are both plain
      row-major products (``2 d V`` bytes in half precision).
  """

  upcast: bool
  plain_dw: bool
  plain_w: bool


# x86 instructions with which XLA:CPU's bfloat16 matmuls beat float32's.
BF16_DOT_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_flags() -> frozenset[str] | None:
  """The host CPU's feature flags as Linux's ``/proc/cpuinfo`` names them
  (its first ``flags`` line: x86), None where there is none to read."""
  try:
    text = Path("/proc/cpuinfo").read_text()
  except OSError:
    return None
  for line in text.splitlines():
    if line.startswith("flags"):
      return frozenset(line.partition(":")[2].split())
  return None


def matmul_policy(dtype, vocab_major: bool = False,
                  backend: str | None = None) -> MatmulPolicy:
  """The policy for ``dtype`` and ``w``'s layout on ``backend`` (default:
  JAX's default backend), chosen by measurement (``scripts/bench.py``).

  XLA's CPU backend runs plain row-major products through its fast path
  (YNNPACK) and a product with a transposed operand through slower
  kernels. Its bfloat16 products beat float32 only on CPUs with bfloat16
  dot instructions (:data:`BF16_DOT_FLAGS`: 1.4-1.8x float32's rate
  measured, plain products only); without them (AVX2) they ran at 0.7x
  float32. It has no float16 kernels at all (float16 dots are converted
  to float32 inside every dot). So on ``"cpu"``: bfloat16 with those
  instructions all plain products in bfloat16; other half precision (float16,
  bfloat16 without them or where :func:`cpu_flags` cannot tell) upcast
  once per pass; float32 (and upcast half precision) a plain ``dw`` for
  a ``(d, V)`` ``w`` (a ``(V, d)`` one keeps ``dz^T x_c``, whose final
  ``(V, d)`` float32 transpose would cost more than it saves). GPU and TPU
  matmuls take any layout at full rate: the input dtype, as given.
  """
  if (backend or jax.default_backend()) != "cpu":
    return MatmulPolicy(upcast=False, plain_dw=False, plain_w=False)
  if jnp.dtype(dtype) == jnp.bfloat16 and not set(BF16_DOT_FLAGS).isdisjoint(
      cpu_flags() or ()):
    return MatmulPolicy(upcast=False, plain_dw=True, plain_w=True)
  return MatmulPolicy(upcast=jnp.dtype(dtype).itemsize < 4,
                      plain_dw=not vocab_major, plain_w=False)


def explicit_spec(a):
  """``a``'s PartitionSpec on a mesh with Explicit axes, None elsewhere
  (off any mesh, Auto axes, inside ``shard_map``)."""
  s = jax.typeof(a).sharding
  return s.spec if jax.sharding.AxisType.Explicit in s.mesh.axis_types else None


def sharded_like(a, ref):
  """``a`` in the sharding of ``ref`` on a mesh with Explicit axes (a
  cotangent must have its primal's), unchanged elsewhere."""
  spec = explicit_spec(ref)
  return a if spec is None else jax.reshard(a, spec)


def rows_sharding(like):
  """A gather's ``out_sharding`` for a ``(rows,)`` result: ``like``'s row
  sharding on a mesh with Explicit axes (where JAX cannot infer it),
  None elsewhere."""
  spec = explicit_spec(like)
  return None if spec is None else P(spec[0] if spec else None)


def padded_spec(a) -> tuple | None:
  """:func:`explicit_spec` with one entry per dimension of ``a``."""
  spec = explicit_spec(a)
  return None if spec is None else tuple(spec) + (None,) * (
      a.ndim - len(spec))


def _merged(entries):
  """One PartitionSpec entry for a merge of dimensions sharded as
  ``entries``: all their mesh axes, major to minor."""
  names = tuple(n for e in entries if e is not None
                for n in ((e,) if isinstance(e, str) else e))
  return None if not names else names[0] if len(names) == 1 else names


def merge_dims(a, bounds: tuple[int, ...]):
  """``a`` reshaped so that each group of dimensions ``[bounds[i],
  bounds[i + 1])`` becomes one (``bounds`` from 0 to ``a.ndim``). On a
  mesh with Explicit axes a merged dimension is sharded over all of its
  dimensions' axes: JAX infers that only where every dimension is split
  (a ``(batch, seq@seq)`` array raised)."""
  groups = list(itertools.pairwise(bounds))
  shape = tuple(math.prod(a.shape[i:j]) for i, j in groups)
  spec = padded_spec(a)
  if spec is None:
    return a.reshape(shape)
  return lax.reshape(a, shape, out_sharding=P(*(
      _merged(spec[i:j]) for i, j in groups)))


def unflatten_rows(a, batch_shape: tuple[int, ...], batch_spec):
  """``(rows, ...)`` per-row results back to ``batch_shape + (...)``; on a
  mesh with Explicit axes in ``batch_spec`` (the batch dimensions' entries
  of the input's :func:`padded_spec`, None elsewhere): JAX cannot split a
  dimension sharded over several axes by itself."""
  shape = tuple(batch_shape) + a.shape[1:]
  if batch_spec is None:
    return a.reshape(shape)
  return lax.reshape(a, shape, out_sharding=_rows_spec(batch_spec, len(shape)))


def like_rows(a, batch_spec):
  """A per-row array (the batch shape, then any trailing dimensions) in the
  batch sharding ``batch_spec`` (:func:`unflatten_rows`), unchanged where
  that is None: labels, masks and weights split otherwise than the logits
  then meet them row for row."""
  if batch_spec is None:
    return a
  return jax.reshard(a, _rows_spec(batch_spec, a.ndim))


def _rows_spec(batch_spec, ndim: int) -> P:
  """``batch_spec`` for the leading dimensions of an ``ndim``-dimensional
  per-row array, its trailing dimensions replicated."""
  return P(*batch_spec, *(None,) * (ndim - len(batch_spec)))
