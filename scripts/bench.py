"""Benchmark the losses: time and compiled temporaries of ``value_and_grad``.

    python scripts/bench.py                          # logits, fused, model
    python scripts/bench.py --section fused --shapes 2048x512x32000
    python scripts/bench.py --quick --out /tmp/b     # smoke test, seconds

Sections, each with a memory-traffic or FLOP *floor* that the loss cannot
beat:

``logits`` (``BxV``): ``value_and_grad`` w.r.t. the logits ``z`` of
  ``cross_entropy`` (jax_softmax, mean), ``optax`` (
  ``softmax_cross_entropy_with_integer_labels(z, y).mean()``) and
  ``log_softmax`` (a plain ``jax.nn.log_softmax`` version), against the
  floor ``copy``: ``2 * z``, one read and one write of the logits. A loss
  and its gradient read the logits at least twice and write the gradient
  once: about 1.5x a copy.

``fused`` (``BxDxV``): ``value_and_grad`` w.r.t. ``(x, w)`` of
  ``fused`` (``linear_cross_entropy``, mean, gradient in the forward pass),
  ``fused_recompute`` (``grad_in_forward=False``: four matmuls),
  ``optax`` on ``x @ w`` (float32 accumulation), ``return_aux=True``
  three ways:
  ``fused_aux`` (aux kept as metrics, ``has_aux=True``),
  ``fused_aux_discard`` (aux dropped) and ``fused_aux_entropy`` (``loss -
  0.01 * mean(aux.entropy)`` differentiated: not the same loss),
  ``fused_tied_T`` and ``fused_tied_vd`` (a ``(V, d)`` tied embedding
  passed as ``emb.T``, and as it is with ``w_layout="vd"``),
  ``fused_bf16_dots`` and ``fused_converted`` (``fused`` with the CPU's
  matmul policy as on a CPU with bfloat16 dot instructions, plain
  products in the input dtype, and as on one without, half precision
  converted to float32 once: the A/B behind ``matmul_policy``), against
  the floor ``matmuls``: the three bare matmuls ``x w``, ``g w^T`` and
  ``x^T g`` (``g`` a precomputed ``(B, V)`` array in the input dtype, every
  product accumulated and returned in float32). ``matmuls_xt`` is the same
  with ``x^T`` materialised first, so that ``x^T g`` is a plain product: on
  XLA's CPU backend that one runs through YNNPACK, as the fused loss's
  does, where the transposed-operand form takes a slower kernel; a second,
  stricter floor to read the ratios against. ``matmuls_plain``, the
  half-precision floor: the three as plain row-major products ``x w``,
  ``g wT`` and ``xT g``, with ``wT`` ``(V, d)`` and ``xT`` ``(d, B)``
  materialised outside the timed region (operands in the input dtype,
  float32 results). A ``fused in half precision`` table gives, per shape,
  the bfloat16 (float16) fused loss over ``matmuls_plain`` of its dtype and
  over the float32 fused loss of the same run.

``model`` (``BxTxDxV``): logits made inside a model, ``h @ emb.T`` with
  ``h`` of shape ``(B, T, d)`` and ``emb`` ``(V, d)``, ``value_and_grad``
  w.r.t. ``(h, emb)`` of ``cross_entropy`` on the ``(B, T, V)`` logits as
  they come, ``cross_entropy_flat`` (``h`` flattened to ``(B * T, d)``
  first) and ``optax`` on the ``(B, T, V)`` logits, against the floor
  ``matmuls`` (the three matmuls of that head).

Method: for each (shape, dtype) case every implementation is compiled
first (``jax.jit(f).lower(*args).compile()``; its ``memory_analysis()``
gives the compiled temporaries), called once to warm up, then timed
*interleaved*: ``for run in range(runs): for impl in impls:`` one call,
``block_until_ready``. The minimum per implementation is reported, so
background load on a shared machine biases every implementation alike.
An implementation whose temporaries plus outputs exceed ``--mem-limit-gib``
(default: half the device's memory, or half the host's RAM on a CPU) is
compiled but not run, and the table says so.

``sharded`` (``BxDxV``, ``--section sharded`` only): ``value_and_grad``
  of the fused loss with ``w`` split on ``V`` over every device
  (``shard_map``, ``axis_name``; 8 simulated devices on a CPU host) against
  the same loss on one device (``one_device``, the floor of this section).
  The temporaries of a sharded program are per device. On a host whose
  ``XLA_FLAGS`` name no device count, the section runs in a child process
  of this script with ``--xla_force_host_platform_device_count=8`` added
  (jax reads the flags once, when its backend starts).

``objectives`` (``BxDxV``, ``--section objectives`` only): post-training
  at the fused path: ``ppo_fused`` (``linear_log_prob_objective`` with a
  PPO clipped objective and an entropy bonus) against ``ppo_plain`` (plain
  autodiff of the same objective on materialised logits), and
  ``weighted_fused`` (``linear_cross_entropy(..., weights=adv,
  reduction="sum")``) against ``weighted_four_matmuls`` (``sum(adv *
  linear_cross_entropy(..., reduction="none"))``, which recomputes) and
  ``weighted_plain`` (optax on the logits), against the floor ``matmuls``.

``--scale`` adds a compile-only memory comparison at ``4096x256x262144``
float32 (``fused`` vs ``optax``; optax is not run) and runs the fused loss
once. Output: a markdown table on stdout (also ``results.md``),
``results.json`` and ``ratios.png`` (time / floor) in ``--out``. Nothing is
specific to a platform: the same command runs on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_softmax
from jax_softmax import _numerics

F32 = jnp.float32
MIB = 2**20
GIB = 2**30

DEFAULT_SHAPES = {"logits": ((8192, 32000),),
                  "fused": ((2048, 512, 32000), (1024, 1024, 128000)),
                  "model": ((8, 512, 256, 32000),),
                  "sharded": ((2048, 512, 32000),),
                  "objectives": ((2048, 512, 32000), (1024, 1024, 128000))}
QUICK_SHAPES = {"logits": ((256, 1000),),
                "fused": ((96, 32, 999),),
                "model": ((2, 24, 16, 300),),
                "sharded": ((96, 32, 1000),),
                "objectives": ((96, 32, 999),)}
SCALE_SHAPE = (4096, 256, 262144)
# Small, but big enough that the default chunk (256 rows) is below the
# batch: the fused loss then holds no (b, V) buffer and optax does.
QUICK_SCALE_SHAPE = (512, 16, 32768)
QUICK_RUNS = 3
FLOORS = {"logits": "copy", "fused": "matmuls", "model": "matmuls",
          "sharded": "one_device", "objectives": "matmuls"}
SECTIONS = tuple(FLOORS)
ALL = ("logits", "fused", "model")  # --section all; the others on their own
RANKS = {"logits": 2, "fused": 3, "model": 4, "sharded": 3, "objectives": 3}
RANK_NAMES = {2: "BxV", 3: "BxDxV", 4: "BxTxDxV"}
# The sharded section's devices on a CPU host (a GPU host keeps its own).
SIMULATED_DEVICES = "--xla_force_host_platform_device_count=8"
# CPU features of half-precision arithmetic, as /proc/cpuinfo names them.
HALF_FLAGS = ("amx_bf16", "avx512_bf16", "avx512_fp16", "amx_fp16", "f16c")


# ------------------------------------------------------------ impls
@dataclass(frozen=True)
class Impl:
  """One benchmarked function: ``fn(*args)``, jitted by the bench."""
  name: str
  fn: Callable
  loss: bool = True  # whether fn's first output is the loss
  place: Callable | None = None  # puts the inputs where fn wants them


def _logits_impls() -> list[Impl]:
  def ours(z, y):
    return jax_softmax.cross_entropy(z, y)

  def with_optax(z, y):
    return optax.softmax_cross_entropy_with_integer_labels(z, y).mean()

  def plain(z, y):
    lp = jax.nn.log_softmax(z, axis=-1)
    return -jnp.take_along_axis(lp, y[:, None], axis=-1).mean()

  def grad(f):
    return jax.value_and_grad(f, argnums=0)

  return [Impl("cross_entropy", grad(ours)),
          Impl("optax", grad(with_optax)),
          Impl("log_softmax", grad(plain)),
          Impl("copy", lambda z, y: 2 * z, loss=False)]


def _fused_impls() -> list[Impl]:
  lce = jax_softmax.linear_cross_entropy

  def fused(x, w, y, g):
    return lce(x, w, y)

  def recompute(x, w, y, g):
    return lce(x, w, y, grad_in_forward=False)

  def aux(x, w, y, g):  # aux kept as metrics, not differentiated
    return lce(x, w, y, return_aux=True)

  def aux_discard(x, w, y, g):
    return lce(x, w, y, return_aux=True)[0]

  def aux_entropy(x, w, y, g):  # entropy bonus: aux differentiated
    loss, aux_ = lce(x, w, y, return_aux=True)
    return loss - 0.01 * jnp.mean(aux_.entropy)

  def tied_t(x, emb, y, g):  # a (V, d) tied embedding passed as emb.T
    return lce(x, emb.T, y)

  def tied_vd(x, emb, y, g):  # the same embedding, w_layout="vd"
    return lce(x, emb, y, w_layout="vd")

  def policy_as(bf16_dots: bool):  # traced as if the CPU had (or lacked)
    flags = frozenset(_numerics.BF16_DOT_FLAGS if bf16_dots else ())

    def f(x, w, y, g):  # bfloat16 dot instructions
      with mock.patch.object(_numerics, "cpu_flags", lambda: flags):
        return lce(x, w, y)
    return f

  def as_embedding(args):  # (x, w, y, g) -> (x, w.T materialised, y, g)
    x, w, *rest = args
    return (x, jnp.asarray(w.T).copy(), *rest)

  def mm(a, b):  # float32 accumulation and result
    return jnp.matmul(a, b, preferred_element_type=F32)

  def with_optax(x, w, y, g):
    return optax.softmax_cross_entropy_with_integer_labels(mm(x, w), y).mean()

  def matmuls_xt(x, w, y, g):  # x^T materialised: dw as a plain product
    return mm(x, w), mm(g, w.T), mm(lax.optimization_barrier(x.T), g)

  def grad(f, has_aux=False):
    return jax.value_and_grad(f, argnums=(0, 1), has_aux=has_aux)

  return [Impl("fused", grad(fused)),
          Impl("fused_recompute", grad(recompute)),
          Impl("fused_aux", grad(aux, has_aux=True)),
          Impl("fused_aux_discard", grad(aux_discard)),
          Impl("fused_aux_entropy", grad(aux_entropy)),
          Impl("fused_tied_T", grad(tied_t), place=as_embedding),
          Impl("fused_tied_vd", grad(tied_vd), place=as_embedding),
          Impl("fused_bf16_dots", grad(policy_as(True))),
          Impl("fused_converted", grad(policy_as(False))),
          Impl("optax", grad(with_optax)),
          _floor_impls()[0],
          Impl("matmuls_xt", matmuls_xt, loss=False),
          _floor_impls()[1]]


def _floor_impls() -> list[Impl]:
  """The three-matmul floor of a ``(B, D) x (D, V)`` loss: ``matmuls`` as
  written (``g w^T`` and ``x^T g`` with transposed operands) and
  ``matmuls_plain``, three row-major products (the transposes materialised
  outside the timed region)."""

  def mm(a, b):  # float32 accumulation and result
    return jnp.matmul(a, b, preferred_element_type=F32)

  def matmuls(x, w, y, g):
    return mm(x, w), mm(g, w.T), mm(x.T, g)

  def with_transposes(args):  # (x, w, y, g) -> (..., w.T, x.T) materialised
    x, w, *rest = args
    return (x, w, *rest, jnp.asarray(w.T).copy(), jnp.asarray(x.T).copy())

  def matmuls_plain(x, w, y, g, wt, xt):
    return mm(x, w), mm(g, wt), mm(xt, g)

  return [Impl("matmuls", matmuls, loss=False),
          Impl("matmuls_plain", matmuls_plain, loss=False,
               place=with_transposes)]


def _model_impls() -> list[Impl]:
  """Logits made inside a model: ``h @ emb.T`` with ``h`` of shape
  ``(B, T, d)``, differentiated w.r.t. ``h`` and ``emb``."""

  def mm(a, b):  # float32 accumulation and result
    return jnp.matmul(a, b, preferred_element_type=F32)

  def ours(h, emb, y, g):  # the (B, T, V) logits as they come
    return jax_softmax.cross_entropy(mm(h, emb.T), y)

  def ours_flat(h, emb, y, g):  # h flattened to (B * T, d) first
    return jax_softmax.cross_entropy(mm(h.reshape(-1, h.shape[-1]), emb.T),
                                     y.reshape(-1))

  def with_optax(h, emb, y, g):
    return optax.softmax_cross_entropy_with_integer_labels(
        mm(h, emb.T), y).mean()

  def matmuls(h, emb, y, g):  # the floor: the model's three matmuls
    h2 = h.reshape(-1, h.shape[-1])
    return mm(h2, emb.T), mm(g, emb), mm(g.T, h2)

  def grad(f):
    return jax.value_and_grad(f, argnums=(0, 1))

  return [Impl("cross_entropy", grad(ours)),
          Impl("cross_entropy_flat", grad(ours_flat)),
          Impl("optax", grad(with_optax)),
          Impl("matmuls", matmuls, loss=False)]


def _sharded_impls() -> list[Impl]:
  """Vocabulary-parallel fused loss over all devices vs one device."""
  lce = jax_softmax.linear_cross_entropy

  @functools.cache
  def mesh():  # made on first use: listing the impls starts no backend
    return jax.make_mesh((jax.device_count(),), ("model",),
                         axis_types=(jax.sharding.AxisType.Auto,))

  def local(x, w, y):
    return lce(x, w, y, axis_name="model")

  def place(args):
    x, w, y, g = args
    rep = NamedSharding(mesh(), P())
    return (jax.device_put(x, rep),
            jax.device_put(w, NamedSharding(mesh(), P(None, "model"))),
            jax.device_put(y, rep), g)

  def one(x, w, y, g):
    return lce(x, w, y)

  def vocab_parallel(x, w, y, g):
    return jax.shard_map(local, mesh=mesh(),
                         in_specs=(P(), P(None, "model"), P()),
                         out_specs=P())(x, w, y)

  def grad(f):
    return jax.value_and_grad(f, argnums=(0, 1))

  return [Impl("vocab_parallel", grad(vocab_parallel), place=place),
          Impl("one_device", grad(one))]


def _ppo(logp, entropy, old_logp, adv):
  ratio = jnp.exp(logp - old_logp)
  return (-jnp.minimum(ratio * adv, jnp.clip(ratio, 0.8, 1.2) * adv)
          - 0.01 * entropy)


def _objectives_impls() -> list[Impl]:
  """PPO objective and weighted loss: fused, against the four-matmul
  ``sum(adv * linear_cross_entropy(..., "none"))`` and plain autodiff of
  the same objective on materialised logits. ``g`` stands in for the
  per-row advantages (its first column) and the old log-probabilities."""
  js = jax_softmax

  def rows(g, b):
    adv = g[:b, 0].astype(F32) * 1e4   # g is O(1 / V): advantages O(1)
    return adv, -jnp.log(jnp.float32(1000.0)) + adv * 0.0

  def ppo_fused(x, w, y, g):
    adv, old = rows(g, x.shape[0])
    return js.linear_log_prob_objective(x, w, y, _ppo, (old, adv))

  def ppo_plain(x, w, y, g):
    adv, old = rows(g, x.shape[0])
    z = jnp.matmul(x, w, preferred_element_type=F32)
    lp = jax.nn.log_softmax(z)
    logp = jnp.take_along_axis(lp, y[:, None], -1)[:, 0]
    ent = -jnp.sum(jnp.exp(lp) * lp, -1)
    return jnp.mean(_ppo(logp, ent, old, adv))

  def weighted_fused(x, w, y, g):
    return js.linear_cross_entropy(x, w, y, weights=rows(g, x.shape[0])[0],
                                   reduction="sum")

  def weighted_four(x, w, y, g):
    adv = rows(g, x.shape[0])[0]
    return jnp.sum(adv * js.linear_cross_entropy(x, w, y, reduction="none"))

  def weighted_plain(x, w, y, g):
    adv = rows(g, x.shape[0])[0]
    z = jnp.matmul(x, w, preferred_element_type=F32)
    return jnp.sum(adv * optax.softmax_cross_entropy_with_integer_labels(
        z, y))

  def grad(f):
    return jax.value_and_grad(f, argnums=(0, 1))

  return [Impl("ppo_fused", grad(ppo_fused)),
          Impl("ppo_plain", grad(ppo_plain)),
          Impl("weighted_fused", grad(weighted_fused)),
          Impl("weighted_four_matmuls", grad(weighted_four)),
          Impl("weighted_plain", grad(weighted_plain)),
          *_floor_impls()]


IMPLS = {"logits": _logits_impls, "fused": _fused_impls,
         "model": _model_impls, "sharded": _sharded_impls,
         "objectives": _objectives_impls}


def all_impl_names() -> dict[str, list[str]]:
  return {s: [i.name for i in make()] for s, make in IMPLS.items()}


# ------------------------------------------------------------- data
def make_args(section: str, shape: tuple[int, ...], dtype,
              with_g: bool = True) -> tuple:
  """Random inputs (logits of order 1), made on the host: no compiles.

  ``g`` (the floors' ``(B, V)`` cotangent) is a ``(1, 1)`` placeholder
  when ``with_g`` is False: only the ``matmuls*`` floors read it.
  """
  rng = np.random.default_rng(0)

  def normal(shp, scale=1.0):
    a = rng.standard_normal(shp, dtype=np.float32)
    if scale != 1.0:
      a *= np.float32(scale)
    return jax.device_put(a.astype(dtype))

  def labels(b, v):
    return jax.device_put(rng.integers(0, v, b, dtype=np.int32))

  if section == "logits":
    b, v = shape
    return normal((b, v), 2.0), labels(b, v)
  if section == "model":  # (h, emb, y, g): h (B, T, d), emb (V, d)
    b, t, d, v = shape
    return (normal((b, t, d)), normal((v, d), 1 / math.sqrt(d)),
            labels(b * t, v).reshape(b, t),
            normal((b * t, v) if with_g else (1, 1), 1 / v))
  b, d, v = shape
  return (normal((b, d)), normal((d, v), 1 / math.sqrt(d)), labels(b, v),
          normal((b, v) if with_g else (1, 1), 1 / v))


def memory_limit_bytes() -> int:
  """Half the device's memory if it reports it, else half the host RAM."""
  stats = None
  with contextlib.suppress(Exception):
    stats = jax.devices()[0].memory_stats()
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]) // 2
  try:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    ram = 16 * GIB
  return int(ram) // 2


def machine_info() -> dict:
  try:
    usable = len(os.sched_getaffinity(0))
  except AttributeError:
    usable = os.cpu_count()
  return {"platform": platform.platform(),
          "processor": platform.processor() or platform.machine(),
          "python": platform.python_version(),
          "jax": jax.__version__,
          "backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()],
          "device_kind": jax.devices()[0].device_kind,
          "cpu_count": os.cpu_count(),
          "cpus_usable": usable,
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "cpu_half_flags": half_precision_cpu_flags()}


def half_precision_cpu_flags() -> list[str] | None:
  """Which of ``HALF_FLAGS`` /proc/cpuinfo lists (None off Linux x86)."""
  flags = _numerics.cpu_flags()
  return None if flags is None else [f for f in HALF_FLAGS if f in flags]


# ----------------------------------------------------------- timing
def _mem(compiled) -> dict:
  ma = None
  with contextlib.suppress(Exception):
    ma = compiled.memory_analysis()
  if ma is None:
    return {"temp_bytes": None, "arg_bytes": None, "out_bytes": None}
  return {"temp_bytes": int(ma.temp_size_in_bytes),
          "arg_bytes": int(ma.argument_size_in_bytes),
          "out_bytes": int(ma.output_size_in_bytes)}


def _call(compiled, args) -> tuple[float, object]:
  t0 = time.perf_counter()
  out = compiled(*args)
  jax.block_until_ready(out)
  return time.perf_counter() - t0, out


def _loss_value(impl: Impl, out) -> float | None:
  if not impl.loss:
    return None
  value = out[0]
  while isinstance(value, tuple):  # (loss, aux) under has_aux
    value = value[0]
  return float(value)


def _compile(impl: Impl, args, mem_limit: int) -> tuple[object, dict]:
  """Compiles ``impl`` for ``args``: the executable and the row's compile
  time and memory, with ``skipped`` set where the temporaries and outputs
  exceed ``mem_limit`` (then it is not to be run)."""
  t0 = time.perf_counter()
  comp = jax.jit(impl.fn).lower(*args).compile()
  info = {"compile_s": time.perf_counter() - t0, **_mem(comp),
          "skipped": None}
  need = (info["temp_bytes"] or 0) + (info["out_bytes"] or 0)
  if need > mem_limit:
    info["skipped"] = (f"skipped: needs {need / GIB:.1f} GiB of "
                       f"temporaries and outputs > limit "
                       f"{mem_limit / GIB:.1f} GiB")
  return comp, info


def run_case(section, shape, dtype, impls, runs, mem_limit, log):
  """Compile all impls, warm each up, time them interleaved; rows out."""
  gc.collect()
  args = make_args(section, shape, dtype)
  jax.block_until_ready(args)
  rows, compiled = {}, {}
  placed = {i.name: i.place(args) if i.place else args for i in impls}
  for impl in impls:
    comp, info = _compile(impl, placed[impl.name], mem_limit)
    rows[impl.name] = {"section": section, "shape": list(shape),
                       "dtype": jnp.dtype(dtype).name, "impl": impl.name,
                       "floor": FLOORS[section], **info, "loss": None,
                       "times_ms": []}
    if info["skipped"]:
      log(f"  {impl.name}: {info['skipped']}")
    else:
      compiled[impl.name] = comp
  by_name = {i.name: i for i in impls}
  for name, comp in compiled.items():  # one warm-up call each
    dt, out = _call(comp, placed[name])
    rows[name]["warmup_ms"] = 1e3 * dt
    rows[name]["loss"] = _loss_value(by_name[name], out)
    del out
  for _ in range(runs):
    for name, comp in compiled.items():
      dt, out = _call(comp, placed[name])
      del out
      rows[name]["times_ms"].append(1e3 * dt)
  del args, placed, compiled
  return _finish(list(rows.values()))


def _ratio(a, b):
  return a / b if a is not None and b else None


def _finish(rows):
  """Fill min/median times and the ratios to the floor and to optax."""
  for r in rows:
    t = r["times_ms"]
    r["min_ms"] = min(t) if t else None
    r["median_ms"] = statistics.median(t) if t else None
  by = {r["impl"]: r for r in rows}
  for r in rows:
    for key, ref in (("ratio_floor", r["floor"]), ("ratio_optax", "optax")):
      r[key] = _ratio(r["min_ms"], by.get(ref, {}).get("min_ms"))
  return rows


def half_precision(rows) -> list[dict]:
  """Per fused shape and half dtype: the fused loss's time over
  ``matmuls_plain`` of that dtype and over the float32 fused loss."""
  ms = {(shape_str(r["shape"]), r["dtype"], r["impl"]): r["min_ms"]
        for r in rows if r["section"] == "fused"}
  out = []
  for (shape, dtype, impl), t in ms.items():
    if impl == "fused" and dtype in ("bfloat16", "float16"):
      plain = ms.get((shape, dtype, "matmuls_plain"))
      f32 = ms.get((shape, "float32", "fused"))
      out.append({"shape": shape, "dtype": dtype, "fused_ms": t,
                  "matmuls_plain_ms": plain, "fused_float32_ms": f32,
                  "fused_over_plain": _ratio(t, plain),
                  "fused_over_float32": _ratio(t, f32)})
  return out


def run_scale(shape, runs_fused, mem_limit, log):
  """Compile fused and optax at a large shape; run only the fused one."""
  section = "fused"
  impls = [i for i in _fused_impls() if i.name in ("fused", "optax")]
  gc.collect()
  args = make_args(section, shape, F32, with_g=False)
  jax.block_until_ready(args)
  rows = []
  for impl in impls:
    comp, info = _compile(impl, args, mem_limit)
    row = {"section": "scale", "shape": list(shape), "dtype": "float32",
           "impl": impl.name, **info, "times_ms": [], "loss": None}
    if impl.name == "optax":
      row["skipped"] = "compile only (memory comparison)"
    elif not row["skipped"]:
      for _ in range(runs_fused):
        dt, out = _call(comp, args)
        row["loss"] = _loss_value(impl, out)
        del out
        row["times_ms"].append(1e3 * dt)
    row["min_ms"] = min(row["times_ms"]) if row["times_ms"] else None
    log(f"  scale {impl.name}: temporaries "
        f"{_fmt_mib(row['temp_bytes'])} MiB"
        + (f", {row['min_ms']:.1f} ms" if row["min_ms"] else "")
        + (f" ({row['skipped']})" if row["skipped"] else ""))
    rows.append(row)
    del comp
  return rows


# ----------------------------------------------------------- output
def _fmt_mib(b):
  return "n/a" if b is None else f"{b / MIB:.1f}"


def _fmt(x, spec):
  return "–" if x is None else format(x, spec)


def shape_str(shape):
  return "x".join(str(s) for s in shape)


def table(rows) -> str:
  head = ("| shape | dtype | impl | min ms | median ms | / floor | / optax "
          "| temporaries MiB | note |")
  lines = [head, "|" + "---|" * 9]
  for r in rows:
    note = r["skipped"] or ("floor" if r["impl"] == r.get("floor") else "")
    lines.append(
        f"| {shape_str(r['shape'])} | {r['dtype']} | {r['impl']} "
        f"| {_fmt(r['min_ms'], '.2f')} | {_fmt(r.get('median_ms'), '.2f')} "
        f"| {_fmt(r.get('ratio_floor'), '.3f')} "
        f"| {_fmt(r.get('ratio_optax'), '.3f')} "
        f"| {_fmt_mib(r['temp_bytes'])} | {note} |")
  return "\n".join(lines)


def plot(results, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  sections = [s for s in SECTIONS if any(r["section"] == s for r in results)]
  fig, axes = plt.subplots(1, max(len(sections), 1), squeeze=False,
                           figsize=(6.5 * max(len(sections), 1), 4.5))
  for ax, section in zip(axes[0], sections, strict=False):
    rows = [r for r in results if r["section"] == section]
    cases = list(dict.fromkeys(
        (shape_str(r["shape"]), r["dtype"]) for r in rows))
    names = list(dict.fromkeys(r["impl"] for r in rows))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
      vals = []
      for shape, dtype in cases:
        match = [r for r in rows if r["impl"] == name
                 and shape_str(r["shape"]) == shape and r["dtype"] == dtype]
        ratio = match[0]["ratio_floor"] if match else None
        vals.append(np.nan if ratio is None else ratio)
      pos = np.arange(len(cases)) + (k - (len(names) - 1) / 2) * width
      bars = ax.bar(pos, vals, width, label=name)
      ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(cases)),
                  [f"{s}\n{d}" for s, d in cases], fontsize=8)
    ax.set_ylabel(f"time / {FLOORS[section]} (min of interleaved runs)")
    ax.set_title(f"{section}: value_and_grad time relative to the floor")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ------------------------------------------------------------ flags
def _shapes(text):
  try:
    shapes = [tuple(int(n) for n in part.lower().split("x"))
              for part in text.split(",") if part.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"expected shapes like 8192x32000,2048x512x32000; got {text!r}"
    ) from None
  if not shapes or any(len(s) not in (2, 3, 4) or min(s) < 1
                       for s in shapes):
    raise argparse.ArgumentTypeError(
        f"each shape is BxV (logits), BxDxV (fused, objectives) or BxTxDxV "
        f"(model); got {text!r}")
  return shapes


def _dtypes(text):
  out = []
  for name in text.split(","):
    if name.strip() not in ("float32", "bfloat16", "float16"):
      raise argparse.ArgumentTypeError(
          f"dtype must be float32, bfloat16 or float16; got {name!r}")
    out.append(jnp.dtype(name.strip()))
  return out


def _csv(text):
  return [s.strip() for s in text.split(",") if s.strip()]


def _positive_int(text):
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected an int, got {text!r}"
                                     ) from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
  return value


def build_parser() -> argparse.ArgumentParser:
  names = all_impl_names()
  p = argparse.ArgumentParser(
      prog="bench.py", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument(
      "--section", choices=(*SECTIONS, "all"), default="all",
      help="all = logits, fused and model; sharded (run it on its own) "
      "compares "
      "the vocabulary-parallel fused loss over every device (8 simulated "
      "CPU devices on a CPU host) with one device, temporaries per device")
  p.add_argument(
      "--shapes", type=_shapes, default=None,
      help="comma list; BxV shapes go to the logits section, BxDxV to "
      "the fused one and BxTxDxV to the model one (default: " + ", ".join(
          f"{s} " + ",".join(map(shape_str, v))
          for s, v in DEFAULT_SHAPES.items()) + ")")
  p.add_argument("--dtype", type=_dtypes, default="float32,bfloat16",
                 help="comma list of float32, bfloat16, float16")
  p.add_argument(
      "--impls", type=_csv, default=None,
      help="comma list (default: all of the section; the floor always "
      "runs). " + "; ".join(f"{s}: {','.join(v)}" for s, v in names.items()))
  p.add_argument("--runs", type=_positive_int, default=None,
                 help=f"interleaved timed runs (default 7; {QUICK_RUNS} "
                 "with --quick)")
  p.add_argument("--out", type=Path, default=Path("bench_out"),
                 help="directory for results.json, results.md, ratios.png")
  p.add_argument("--quick", action="store_true",
                 help="tiny shapes (unless --shapes): a smoke test")
  p.add_argument("--scale", action="store_true",
                 help=f"also compare temporaries at {shape_str(SCALE_SHAPE)} "
                 "float32, fused vs optax (optax compiled only)")
  p.add_argument("--mem-limit-gib", type=float, default=None,
                 help="skip running an impl whose temporaries + outputs "
                 "exceed this (default: half the device memory or host RAM)")
  return p


def plan(args, parser) -> dict[str, tuple[list, list[str]]]:
  """Per section: (shapes, impl names) to run."""
  sections = ALL if args.section == "all" else (args.section,)
  names = all_impl_names()
  known = {n for s in sections for n in names[s]}
  if args.impls:
    unknown = [n for n in args.impls if n not in known]
    if unknown:
      parser.error(f"unknown --impls {unknown} for section(s) {sections}; "
                   f"known: {sorted(known)}")
  out = {}
  for s in sections:
    rank = RANKS[s]
    if args.shapes is not None:
      shapes = [sh for sh in args.shapes if len(sh) == rank]
      if not shapes:
        if args.section != "all":
          parser.error(f"--shapes has no {RANK_NAMES[rank]} shape for "
                       f"section {s}")
        continue
    else:
      shapes = list((QUICK_SHAPES if args.quick else DEFAULT_SHAPES)[s])
    chosen = [n for n in names[s]
              if args.impls is None or n in args.impls or n == FLOORS[s]]
    out[s] = (shapes, chosen)
  return out


# ------------------------------------------------------------- main
def _with_simulated_devices(argv: list[str], out: Path) -> dict:
  """Runs this script on ``argv`` in a child process whose ``XLA_FLAGS``
  add ``SIMULATED_DEVICES`` (jax reads them when its backend starts, which
  in this process may have happened); its results.json is the result."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {SIMULATED_DEVICES}"
  # The child imports the jax_softmax this process did.
  root = str(Path(jax_softmax.__file__).resolve().parents[1])
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (root, env.get("PYTHONPATH")) if p)
  code = subprocess.run([sys.executable, str(Path(__file__).resolve()),
                         *argv], env=env, check=False).returncode
  if code:
    raise SystemExit(code)
  return json.loads((out / "results.json").read_text())


def main(argv: list[str] | None = None) -> dict:
  parser = build_parser()
  args = parser.parse_args(argv)
  runs = args.runs or (QUICK_RUNS if args.quick else 7)
  work = plan(args, parser)
  if "sharded" in work and "device_count" not in os.environ.get(
      "XLA_FLAGS", ""):
    return _with_simulated_devices(
        sys.argv[1:] if argv is None else list(argv), args.out)
  mem_limit = (int(args.mem_limit_gib * GIB) if args.mem_limit_gib
               else memory_limit_bytes())
  args.out.mkdir(parents=True, exist_ok=True)
  report = io.StringIO()

  def say(text=""):
    print(text, flush=True)
    report.write(text + "\n")

  def log(text):  # progress: stderr only
    print(text, file=sys.stderr, flush=True)

  machine = machine_info()
  say("# jax_softmax benchmark")
  say()
  say(f"- machine: {machine['platform']} ({machine['processor']}), "
      f"{machine['cpu_count']} CPUs ({machine['cpus_usable']} usable)")
  say(f"- jax {machine['jax']}, backend {machine['backend']}, devices "
      f"{machine['devices']} ({machine['device_kind']})")
  say(f"- {runs} interleaved runs per case after one warm-up call; the "
      f"minimum is reported; memory limit {mem_limit / GIB:.1f} GiB")
  if machine["xla_flags"]:
    say(f"- XLA_FLAGS={machine['xla_flags']}")
  if machine["cpu_half_flags"] is not None:
    have = machine["cpu_half_flags"]
    say(f"- half-precision CPU flags (/proc/cpuinfo): "
        f"{' '.join(have) or 'none'} (absent: "
        f"{' '.join(f for f in HALF_FLAGS if f not in have) or 'none'})")

  t_start = time.perf_counter()
  results, scale = [], []
  for section, (shapes, names) in work.items():
    impls = [i for i in IMPLS[section]() if i.name in names]
    rows = []
    for shape in shapes:
      for dtype in args.dtype:
        t0 = time.perf_counter()
        log(f"[{section}] {shape_str(shape)} {jnp.dtype(dtype).name}: "
            f"{', '.join(names)}")
        case = run_case(section, shape, dtype, impls, runs, mem_limit, log)
        log(f"  done in {time.perf_counter() - t0:.1f} s")
        rows += case
    results += rows
    say()
    say(f"## {section} (floor: {FLOORS[section]})")
    say()
    say(table(rows))
  half = half_precision(results)
  if half:
    say()
    say("## fused in half precision")
    say()
    say("| shape | dtype | fused ms | matmuls_plain ms | fused / plain "
        "| fused float32 ms | fused / fused float32 |")
    say("|" + "---|" * 7)
    for h in half:
      say(f"| {h['shape']} | {h['dtype']} | {_fmt(h['fused_ms'], '.2f')} "
          f"| {_fmt(h['matmuls_plain_ms'], '.2f')} "
          f"| {_fmt(h['fused_over_plain'], '.3f')} "
          f"| {_fmt(h['fused_float32_ms'], '.2f')} "
          f"| {_fmt(h['fused_over_float32'], '.3f')} |")
  if args.scale:
    shape = QUICK_SCALE_SHAPE if args.quick else SCALE_SHAPE
    log(f"[scale] {shape_str(shape)} float32")
    scale = run_scale(shape, 1, mem_limit, log)
    say()
    say(f"## scale: {shape_str(shape)} float32 (compile-only for optax)")
    say()
    say("| impl | temporaries MiB | outputs MiB | ms (one run) | note |")
    say("|---|---|---|---|---|")
    for r in scale:
      say(f"| {r['impl']} | {_fmt_mib(r['temp_bytes'])} "
          f"| {_fmt_mib(r['out_bytes'])} | {_fmt(r['min_ms'], '.1f')} "
          f"| {r['skipped'] or ''} |")
    temps = {r["impl"]: r["temp_bytes"] for r in scale}
    if temps.get("fused") and temps.get("optax"):
      say()
      say(f"optax / fused temporaries: "
          f"{temps['optax'] / temps['fused']:.1f}x")
  wall = time.perf_counter() - t_start
  say()
  say(f"wall time {wall:.1f} s")

  data = {"machine": machine, "runs": runs, "mem_limit_bytes": mem_limit,
          "argv": sys.argv[1:] if argv is None else list(argv),
          "wall_s": wall, "results": results, "half_precision": half,
          "scale": scale}
  (args.out / "results.json").write_text(json.dumps(data, indent=1))
  (args.out / "results.md").write_text(report.getvalue())
  if results:
    plot(results, args.out / "ratios.png")
  return data


if __name__ == "__main__":
  main()
