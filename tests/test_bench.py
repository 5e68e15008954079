"""Smoke test of scripts/bench.py: ``--quick`` end to end, in-process."""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"


@pytest.fixture(scope="module")
def bench():
  spec = importlib.util.spec_from_file_location("jax_softmax_bench", BENCH)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up
  try:
    spec.loader.exec_module(module)
    yield module
  finally:
    sys.modules.pop(spec.name, None)


@pytest.mark.slow
def test_quick_run_writes_complete_results(bench, tmp_path, capsys):
  bench.main(["--quick", "--scale", "--runs", "2", "--dtype", "float32",
              "--out", str(tmp_path)])
  printed = capsys.readouterr().out
  data = json.loads((tmp_path / "results.json").read_text())
  assert (tmp_path / "ratios.png").stat().st_size > 1000
  assert (tmp_path / "results.md").read_text() in printed
  assert "| shape | dtype | impl | min ms" in printed
  assert data["machine"]["devices"] and data["machine"]["cpu_count"]

  rows = data["results"]
  all_names = bench.all_impl_names()
  for section in bench.ALL:  # what --section all runs
    impls = all_names[section]
    floor = bench.FLOORS[section]
    bare = {i.name for i in bench.IMPLS[section]() if not i.loss}
    assert floor in bare
    assert floor in impls and "optax" in impls
    case = {r["impl"]: r for r in rows if r["section"] == section}
    assert set(case) == set(impls), section
    assert {r["dtype"] for r in case.values()} == {"float32"}
    for name, r in case.items():
      assert r["skipped"] is None
      assert len(r["times_ms"]) == 2 and min(r["times_ms"]) > 0
      assert r["min_ms"] == min(r["times_ms"])
      assert r["temp_bytes"] is not None and r["temp_bytes"] >= 0
      assert r["ratio_floor"] > 0 and r["ratio_optax"] > 0
      if name in bare:  # the floors return no loss
        assert r["loss"] is None
      else:
        assert math.isfinite(r["loss"]) and r["loss"] > 0
    assert case[floor]["ratio_floor"] == 1.0
    assert case["optax"]["ratio_optax"] == 1.0
    # Every loss implementation computes the same mean cross-entropy.
    # (fused_aux_entropy adds an entropy bonus: a different loss.)
    ref = case["optax"]["loss"]
    for name in impls:
      if name not in bare | {"fused_aux_entropy"}:
        assert case[name]["loss"] == pytest.approx(ref, rel=1e-4), name

  scale = {r["impl"]: r for r in data["scale"]}
  assert set(scale) == {"fused", "optax"}
  assert scale["fused"]["min_ms"] > 0 and scale["optax"]["times_ms"] == []
  assert scale["optax"]["temp_bytes"] >= scale["fused"]["temp_bytes"]


@pytest.mark.slow
def test_bfloat16_subset_with_the_floor(bench, tmp_path):
  bench.main(["--section", "fused", "--shapes", "64x16x300", "--impls",
              "fused", "--dtype", "bfloat16", "--runs", "1", "--out",
              str(tmp_path)])
  data = json.loads((tmp_path / "results.json").read_text())
  rows = {r["impl"]: r for r in data["results"]}
  assert set(rows) == {"fused", "matmuls"}
  assert {r["dtype"] for r in rows.values()} == {"bfloat16"}
  assert rows["matmuls"]["ratio_floor"] == 1.0
  assert rows["fused"]["ratio_floor"] > 0
  assert rows["fused"]["ratio_optax"] is None  # optax not selected
  assert math.isfinite(rows["fused"]["loss"])
  assert (tmp_path / "ratios.png").exists()


@pytest.mark.slow
def test_half_precision_table(bench, tmp_path):
  bench.main(["--section", "fused", "--shapes", "64x16x300", "--impls",
              "fused,matmuls_plain", "--dtype", "float32,bfloat16", "--runs",
              "1", "--out", str(tmp_path)])
  data = json.loads((tmp_path / "results.json").read_text())
  rows = {(r["impl"], r["dtype"]): r for r in data["results"]}
  assert set(rows) == {(i, d) for i in ("fused", "matmuls", "matmuls_plain")
                       for d in ("float32", "bfloat16")}
  assert rows["matmuls_plain", "bfloat16"]["loss"] is None
  (half,) = data["half_precision"]
  assert (half["shape"], half["dtype"]) == ("64x16x300", "bfloat16")
  assert half["fused_over_plain"] == pytest.approx(
      half["fused_ms"] / rows["matmuls_plain", "bfloat16"]["min_ms"])
  assert half["fused_over_float32"] == pytest.approx(
      half["fused_ms"] / rows["fused", "float32"]["min_ms"])
  assert "## fused in half precision" in (tmp_path / "results.md"
                                          ).read_text()
  flags = data["machine"]["cpu_half_flags"]
  assert flags is None or set(flags) <= set(bench.HALF_FLAGS)


def test_memory_limit_skips_instead_of_running(bench, tmp_path, capsys):
  bench.main(["--quick", "--section", "logits", "--impls", "optax",
              "--dtype", "float32", "--runs", "1", "--mem-limit-gib", "1e-9",
              "--out", str(tmp_path)])
  data = json.loads((tmp_path / "results.json").read_text())
  rows = {r["impl"]: r for r in data["results"]}
  assert set(rows) == {"optax", "copy"}  # the floor always comes along
  for r in rows.values():
    assert "limit" in r["skipped"] and r["times_ms"] == []
    assert r["min_ms"] is None and r["ratio_floor"] is None
    assert r["temp_bytes"] is not None  # compiled, analysed, not run
  assert capsys.readouterr().out.count("| skipped: needs ") == 2


def test_flags_are_validated(bench):
  with pytest.raises(SystemExit):
    bench.main(["--impls", "nope"])
  with pytest.raises(SystemExit):
    bench.main(["--section", "fused", "--shapes", "64x100"])
  with pytest.raises(SystemExit):
    bench.main(["--dtype", "int8"])


@pytest.mark.slow
def test_sharded_section_on_simulated_devices(tmp_path):
  """--section sharded simulates 8 CPU devices in its own process."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(
      [sys.executable, str(BENCH), "--section", "sharded", "--quick",
       "--dtype", "float32", "--out", str(tmp_path)],
      env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  data = json.loads((tmp_path / "results.json").read_text())
  assert len(data["machine"]["devices"]) == 8
  case = {r["impl"]: r for r in data["results"]}
  assert set(case) == {"vocab_parallel", "one_device"}
  assert case["vocab_parallel"]["loss"] == pytest.approx(
      case["one_device"]["loss"], rel=1e-5)
  # w split 8 ways: fewer temporaries per device than on one device.
  assert case["vocab_parallel"]["temp_bytes"] < case["one_device"][
      "temp_bytes"]


@pytest.mark.parametrize(("name", "operand"), [("fused_bf16_dots", "bf16"),
                                               ("fused_converted", "f32")])
def test_policy_impls_trace_the_policy_they_name(bench, name, operand):
  # The A/B behind the CPU's bfloat16 policy: each impl lowers its dots
  # with the operands of the policy it names, whatever this CPU has.
  import jax
  import jax.numpy as jnp
  (impl,) = [i for i in bench.IMPLS["fused"]() if i.name == name]
  bf16 = jnp.bfloat16
  args = (jnp.zeros((64, 16), bf16), jnp.zeros((16, 300), bf16),
          jnp.zeros((64,), jnp.int32), jnp.zeros((64, 300), bf16))
  text = jax.jit(impl.fn).lower(*args).as_text()
  operands = re.findall(r"stablehlo\.dot_general[^\n]*: "
                        r"\(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\)",
                        text)
  assert operands == [(operand, operand)] * 3
