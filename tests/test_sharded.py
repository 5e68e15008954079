"""Runs tests/multidevice in a subprocess with 8 simulated CPU devices."""

import os
import pathlib
import subprocess
import sys

import pytest

# Each test starts subprocesses (8 simulated devices, 2 processes): slow.
pytestmark = pytest.mark.slow

HERE = pathlib.Path(__file__).parent


BIG = "test_vocab_parallel_1d or test_2d_mesh_batch_axis_name"


@pytest.mark.parametrize("select", [BIG, f"not ({BIG})"],
                         ids=["large_matrices", "rest"])
def test_mesh_suite_on_8_simulated_devices(select):
  # Two halves, so that pytest-xdist workers run them side by side
  # (compilation is mostly single-threaded).
  env = dict(os.environ,
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
       "-n", "0", str(HERE / "multidevice"), "-k", select], env=env,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      timeout=900)
  log = proc.stdout
  assert proc.returncode == 0, log[-5000:]
  assert " passed" in log and "skipped" not in log


def test_two_processes_equal_one_process(tmp_path):
  import socket

  import jax
  import numpy as np

  sys.path.insert(0, str(HERE / "multidevice"))
  try:
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = str(s.getsockname()[1])
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen(
        [sys.executable, str(HERE / "multidevice" / "worker.py"), str(i),
         port, str(tmp_path)], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
    import worker  # the worker's data and loss (its main() is not run)
  finally:
    sys.path.pop(0)
  x, w, y = worker.data()
  loss, (dx, dw) = jax.value_and_grad(worker.loss_fn, (0, 1))(x, w, y)
  for i in range(2):
    got = np.load(tmp_path / f"proc{i}.npz")
    assert int(got["devices"]) == 4
    np.testing.assert_allclose(got["loss"], loss, rtol=1e-6)
    np.testing.assert_allclose(got["dw"], dw, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got["dx"], dx[got["lo"]:got["hi"]],
                               rtol=1e-5, atol=1e-7)


def test_readme_sharded_example_runs_and_matches_one_device():
  script = HERE.parent / "scripts" / "sharded_example.py"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, str(script)], env=env,
                        capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  assert "devices: 8" in proc.stdout
