"""Tests of scripts/train.py: a short run, kill-and-resume, flags."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train.py"
_spec = importlib.util.spec_from_file_location("train_script", SCRIPT)
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)

SHORT = ["--epochs", "4"]
METRIC_KEYS = {"train_loss", "train_accuracy", "test_loss", "test_accuracy",
               "epochs_completed", "backend", "config", "history"}

# Runs the script, but holds each process after its first checkpoint so the
# test's SIGKILL lands mid-run rather than racing the end of training.
HOLD_AFTER_CHECKPOINT = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("train", sys.argv[1])
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)
save = train.save_checkpoint
def save_and_hold(*args):
    save(*args)
    time.sleep(600)
train.save_checkpoint = save_and_hold
train.main(sys.argv[2:])
"""


def metrics(out):
  return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("short")
  assert train.main([*SHORT, "--out", str(out)]) == 0
  return out


def test_short_run_writes_metrics_curves_and_checkpoints(short_run):
  m = metrics(short_run)
  assert METRIC_KEYS <= m.keys()
  assert m["epochs_completed"] == 4
  assert m["backend"] == jax.default_backend()
  assert all(len(v) == 4 for v in m["history"].values())
  assert m["test_accuracy"] == m["history"]["test_accuracy"][-1] > 0.9
  assert m["history"]["train_loss"][-1] < m["history"]["train_loss"][0]
  assert (short_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  names = sorted(p.name for p in (short_run / "checkpoints").iterdir())
  assert names == [f"epoch_{e:04d}.npz" for e in range(1, 5)]


def test_rerun_of_finished_run_says_complete(short_run, capsys):
  before = metrics(short_run)
  assert train.main([*SHORT, "--out", str(short_run)]) == 0
  assert "is complete (4 epochs)" in capsys.readouterr().out
  assert metrics(short_run) == before


@pytest.mark.parametrize("flags, message", [
    (["--lr", "0.5"], "lr: 0.03 there, 0.5 here"),
    (["--model", "mlp"], "model: linear there, mlp here"),
])
def test_resume_with_other_settings_is_refused(short_run, capsys, flags,
                                               message):
  with pytest.raises(SystemExit) as e:
    train.main([*SHORT, *flags, "--out", str(short_run)])
  assert e.value.code == 2
  assert message in capsys.readouterr().err


def write_blobs(path, n=400):
  """Three well separated Gaussian blobs in 5-D, as a --data file."""
  rng = np.random.default_rng(0)
  y = rng.integers(0, 3, n)
  np.savez(path, X=rng.normal(size=(n, 5)) + 3 * np.eye(3, 5)[y], y=y)
  return path


def test_own_data_file(tmp_path):
  data = write_blobs(tmp_path / "blobs.npz")
  out = tmp_path / "out"
  assert train.main(["--data", str(data), "--optimizer", "sgd", "--epochs",
                     "3", "--out", str(out)]) == 0
  assert metrics(out)["test_accuracy"] > 0.9


# Two simulated devices: batches really are sharded, and 31-row batches
# are rounded up to 32 and the last one padded, the padding masked out.
SUBPROCESS_ENV = {**os.environ, "JAX_PLATFORMS": "cpu",
                  "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}


@pytest.fixture
def spawn():
  """Starts python subprocesses; kills any still running at teardown."""
  procs = []

  def start(*args):
    procs.append(subprocess.Popen(
        [sys.executable, *args], env=SUBPROCESS_ENV,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs[-1]
  yield start
  for proc in procs:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, spawn):
  flags = ["--model", "mlp", "--hidden", "16", "--epochs", "3",
           "--batch-size", "31", "--data", write_blobs(tmp_path / "b.npz")]
  full, killed = tmp_path / "full", tmp_path / "killed"
  uninterrupted = spawn(SCRIPT, *flags, "--out", full)
  victim = spawn("-c", HOLD_AFTER_CHECKPOINT, SCRIPT, *flags, "--out", killed)
  deadline = time.monotonic() + 120
  while not (killed / "checkpoints" / "epoch_0001.npz").exists():
    assert victim.poll() is None, "the run ended before its checkpoint"
    assert time.monotonic() < deadline
    time.sleep(0.05)
  victim.kill()  # SIGKILL
  assert victim.wait() == -9
  # What a SIGKILL in the middle of writing the next checkpoint leaves.
  (killed / "checkpoints" / "epoch_0002.npz.x1y2.tmp").write_bytes(b"PK\3")

  resumed = subprocess.run(
      [sys.executable, SCRIPT, *flags, "--out", killed], env=SUBPROCESS_ENV,
      capture_output=True, text=True, check=True)
  assert "resuming from epoch 1" in resumed.stdout
  assert uninterrupted.wait() == 0
  assert metrics(killed) == metrics(full)
  assert metrics(full)["epochs_completed"] == 3
  with (np.load(full / "checkpoints" / "epoch_0003.npz") as a,
        np.load(killed / "checkpoints" / "epoch_0003.npz") as b):
    assert a.files == b.files
    for key in a.files:  # parameters and optimizer state, bit for bit
      np.testing.assert_array_equal(a[key], b[key], strict=True)
  assert not list(killed.glob("**/*.tmp"))


@pytest.mark.parametrize("argv", [
    ["--model", "cnn"],
    ["--optimizer", "rmsprop"],
    ["--lr", "-1"],
    ["--lr", "nan"],
    ["--epochs", "0"],
    ["--batch-size", "ten"],
    ["--reg", "-0.1"],
    ["--seed", "-1"],
    ["--mesh", "model=2"],
    ["--mesh", "data=0"],
    ["--mesh", "data=100000"],
    ["--data", "no/such/file.npz"],
    ["--bogus"],
])
def test_bad_flags_exit_2(argv, tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    train.main([*argv, "--out", str(tmp_path)])
  assert e.value.code == 2
  assert "error:" in capsys.readouterr().err


def test_help_explains_every_flag(capsys):
  with pytest.raises(SystemExit) as e:
    train.main(["--help"])
  assert e.value.code == 0
  text = capsys.readouterr().out
  for action in train.build_parser()._actions:
    assert action.help, action.option_strings
    assert action.option_strings[-1] in text


def test_two_processes_match_one_process_on_as_many_devices(tmp_path, spawn):
  """Two processes of 2 devices each (jax.distributed, gloo on loopback)
  train exactly as one process with 4 devices."""
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  flags = ["--model", "mlp", "--hidden", "16", "--epochs", "2",
           "--data", write_blobs(tmp_path / "b.npz")]
  workers = [spawn(SCRIPT, *flags, "--out", tmp_path / "multi",
                   "--coordinator-address", f"127.0.0.1:{port}",
                   "--num-processes", "2", "--process-id", str(i))
             for i in range(2)]
  one = subprocess.run(
      [sys.executable, SCRIPT, *flags, "--out", tmp_path / "one"],
      env={**SUBPROCESS_ENV,
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
      capture_output=True, text=True, timeout=300, check=False)
  assert one.returncode == 0, one.stderr[-2000:]
  assert all(w.wait(timeout=300) == 0 for w in workers)
  multi, single = metrics(tmp_path / "multi"), metrics(tmp_path / "one")
  assert multi["config"] == single["config"]
  assert multi["config"]["devices"] == 4
  for key, values in single["history"].items():
    np.testing.assert_allclose(multi["history"][key], values, rtol=1e-5,
                               atol=1e-6)
