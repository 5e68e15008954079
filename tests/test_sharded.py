"""Runs tests/multidevice in a subprocess with 8 simulated CPU devices."""

import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).parent


def test_mesh_suite_on_8_simulated_devices():
  env = dict(os.environ,
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
       str(HERE / "multidevice")],
      env=env, capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
  assert " passed" in proc.stdout and "skipped" not in proc.stdout
