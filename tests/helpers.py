"""Tolerances and closeness checks shared by the test files.

Imported as ``reference`` is (``tests/`` is on ``sys.path`` under pytest's
default import mode): ``from helpers import TOL, assert_close``. NumPy
comparisons of results brought back, and the residuals of a backward pass.
"""

from __future__ import annotations

import re
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np

from jax_softmax import _numerics

# The low-precision input dtypes (gradients come back in them).
LOW = (jnp.bfloat16, jnp.float16)

# (rtol, atol) of values and gradients computed from inputs of each dtype,
# against the float64 reference of the rounded inputs; atol is scaled by
# the size of the expected values where the caller passes one.
TOL = {jnp.bfloat16: (2e-2, 2e-2), jnp.float16: (3e-3, 3e-3),
       jnp.float32: (1e-5, 1e-6), jnp.float64: (1e-12, 1e-13)}

# (rtol, atol) between two float results of each input dtype, ours and
# jax.nn's or scipy's (jax.nn computes in the input dtype, we in float32:
# the bound covers both roundings).
JAX_NN_TOL = {jnp.float16: (4e-3, 4e-3), jnp.bfloat16: (3e-2, 3e-2),
              jnp.float32: (2e-6, 2e-6), jnp.int32: (2e-6, 2e-6)}


def as_float64(x) -> np.ndarray:
  """``x`` (any float dtype, bfloat16 included) exactly in float64, by way
  of float32 (NumPy cannot cast bfloat16 to float64 directly)."""
  return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def finite_scale(v) -> float:
  """``max(1, max |v|)`` over the finite entries of ``v``: the size that an
  absolute tolerance is scaled by."""
  finite = np.abs(np.asarray(v, np.float64))
  finite = finite[np.isfinite(finite)]
  return max(1.0, float(np.max(finite))) if finite.size else 1.0


def rel_err(a, b) -> float:
  """The largest absolute difference relative to the largest ``|b|``."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


def assert_close(actual, expected, dtype, scale=1.0):
  """``actual`` against the float64 ``expected`` within ``TOL[dtype]``, the
  atol scaled by ``scale`` (NaN and inf must match, as in NumPy)."""
  rtol, atol = TOL[dtype]
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected,
                             rtol=rtol, atol=atol * scale)


def assert_rounded_close(actual, expected, dtype, scale=1.0):
  """``actual`` (of ``dtype``) against the float64 ``expected`` rounded to
  ``dtype`` (so overflow to inf is expected); NaN and inf where expected."""
  with np.errstate(over="ignore"):
    expected = np.asarray(np.asarray(expected).astype(dtype), np.float64)
  assert_close(actual, expected, dtype, scale)


def assert_float32_close(actual, expected, dtype, scale=1.0, where=None,
                         msg=""):
  """Both sides rounded to float32, then within ``JAX_NN_TOL[dtype]`` (the
  atol scaled by ``scale``), on the entries ``where`` selects."""
  actual = np.asarray(np.asarray(actual).astype(np.float32), np.float64)
  expected = np.asarray(np.asarray(expected).astype(np.float32), np.float64)
  if where is not None:
    actual, expected = actual[where], expected[where]
  rtol, atol = JAX_NN_TOL[dtype]
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * scale,
                             err_msg=msg)


def assert_same_nans(actual, expected):
  """NaN in exactly the same places."""
  np.testing.assert_array_equal(np.isnan(np.asarray(actual, np.float64)),
                                np.isnan(np.asarray(expected, np.float64)))


def assert_scaled_close(actual, expected, rtol):
  """NaN in the same places, the infinities equal, and the finite entries
  within ``rtol``, with an atol of ``rtol`` times :func:`finite_scale`."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  finite = np.isfinite(expected)
  assert_same_nans(actual, expected)
  np.testing.assert_array_equal(actual[~finite], expected[~finite])
  np.testing.assert_allclose(actual[finite], expected[finite], rtol=rtol,
                             atol=rtol * finite_scale(expected))


def ulp_close(actual, expected, ulps, tiny=0.0):
  """Within ``ulps`` float32 units in the last place of ``expected`` (plus
  ``tiny``), element by element."""
  actual = np.asarray(actual, np.float64)
  spacing = np.spacing(np.abs(expected).astype(np.float32)).astype(
      np.float64)
  err = np.abs(actual - expected)
  assert np.all(err <= ulps * spacing + tiny), np.max(err / spacing)


def saved_residuals(f, *args) -> list[jax.Array]:
  """The arrays the backward pass of ``f`` at ``args`` keeps: the pytree
  leaves of the function :func:`jax.vjp` returns (public API, unlike jax's
  private ``saved_residuals``; the same arrays, in the same order, as
  :func:`jax.ad_checkpoint.print_saved_residuals` lists)."""
  return jax.tree.leaves(jax.vjp(f, *args)[1])


def compile_jit(f, *args):
  """``jax.jit(f)`` lowered and compiled for ``args`` (its HLO text and
  ``memory_analysis()`` are what the work and memory tests read)."""
  return jax.jit(f).lower(*args).compile()


def op_counts(program):
  """How many of each HLO op a compiled program holds (``dot``: matmuls)."""
  ops = re.findall(r"= \w+\[[^\]]*\][^ ]* ([\w-]+)\(", program.as_text())
  return Counter(ops)


def set_bf16_dot_instructions(monkeypatch, present: bool) -> None:
  """Make the CPU's matmul policy see a host with (or without) bfloat16
  dot instructions (``_numerics.BF16_DOT_FLAGS``), whatever this one has."""
  flags = frozenset(_numerics.BF16_DOT_FLAGS[:1] if present else ())
  monkeypatch.setattr(_numerics, "cpu_flags", lambda: flags)
