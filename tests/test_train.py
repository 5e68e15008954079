"""Tests of scripts/train.py and its run directory (scripts/rundir.py): a
short run, kill-and-resume, bad data, damaged checkpoints, locking,
read-only and full directories, flags."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
SCRIPT = SCRIPTS / "train.py"
sys.path.insert(0, str(SCRIPTS))  # train.py imports rundir, _common
import rundir  # noqa: E402

_spec = importlib.util.spec_from_file_location("train_script", SCRIPT)
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)

SHORT = ["--epochs", "4", "--mesh", "data=1"]  # in-process and subprocess
METRIC_KEYS = {"train_loss", "train_accuracy", "test_loss", "test_accuracy",
               "epochs_completed", "backend", "config", "history"}

# Runs the script with argv[1:] (imported from argv[0], a -c program's
# sys.argv[1]), after the program in PATCH has altered the module `train`.
WRAPPER = """
import importlib.util, os, sys
sys.path.insert(0, os.path.dirname(sys.argv[1]))
spec = importlib.util.spec_from_file_location("train", sys.argv[1])
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)
{patch}
raise SystemExit(train.main(sys.argv[2:]))
"""

# Holds the process (with its lock) after its first epoch's files are all
# written, so the test's SIGKILL lands mid-run rather than racing the end.
HOLD_AFTER_FIRST_EPOCH = WRAPPER.format(patch="""
import time
write = train.write_outputs
def write_and_hold(*args, **kwargs):
    write(*args, **kwargs)
    time.sleep(600)
train.write_outputs = write_and_hold
""")

# The disk is full when the third checkpoint is written: its fsync fails.
DISK_FULL_AT_EPOCH_3 = WRAPPER.format(patch="""
import errno
fsync = os.fsync
def full(fd):
    if "epoch_0003.npz" in os.readlink(f"/proc/self/fd/{fd}"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    fsync(fd)
os.fsync = full
""")


def metrics(out):
  return json.loads((out / "metrics.json").read_text())


def snapshot(out):
  """Every file under out: its bytes and modification time."""
  return {p: (p.read_bytes(), p.stat().st_mtime_ns)
          for p in sorted(out.rglob("*")) if p.is_file()}


def one_error_line(err, code_word="error"):
  """The single line a refusal prints (no traceback, no usage)."""
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  assert lines[0].startswith(f"train.py: {code_word}: "), err
  return lines[0]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("short")
  assert train.main([*SHORT, "--out", str(out)]) == 0
  return out


def copy_run(run, dst):
  shutil.copytree(run, dst)
  return dst


def test_short_run_writes_metrics_curves_and_checkpoints(short_run):
  m = metrics(short_run)
  assert METRIC_KEYS <= m.keys()
  assert m["epochs_completed"] == 4
  assert m["backend"] == jax.default_backend()
  assert all(len(v) == 4 for v in m["history"].values())
  assert m["test_accuracy"] == m["history"]["test_accuracy"][-1] > 0.9
  assert m["history"]["train_loss"][-1] < m["history"]["train_loss"][0]
  assert len(m["config"]["data_sha256"]) == 64
  assert (short_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  names = sorted(p.name for p in (short_run / "checkpoints").iterdir())
  assert names == [f"epoch_{e:04d}.npz" for e in (2, 3, 4)]  # keep 3


def test_rerun_of_finished_run_says_complete_and_writes_nothing(
    short_run, capsys):
  before = snapshot(short_run)
  assert train.main([*SHORT, "--out", str(short_run)]) == 0
  assert "is complete (4 epochs)" in capsys.readouterr().out
  # Only the lock file records the new holder's pid.
  lock = short_run / rundir.LOCK_NAME
  assert {p: v for p, v in snapshot(short_run).items() if p != lock} == {
      p: v for p, v in before.items() if p != lock}


@pytest.mark.parametrize("flags, message", [
    (["--lr", "0.5"], "lr: 0.03 there, 0.5 here"),
    (["--model", "mlp"], "model: linear there, mlp here"),
])
def test_resume_with_other_settings_is_refused(short_run, capsys, flags,
                                               message):
  with pytest.raises(SystemExit) as e:
    train.main([*SHORT, *flags, "--out", str(short_run)])
  assert e.value.code == 2
  assert message in one_error_line(capsys.readouterr().err)


def test_extending_a_scheduled_run_is_refused_with_the_alternative(
    short_run, capsys):
  before = snapshot(short_run)
  with pytest.raises(SystemExit) as e:
    train.main(["--epochs", "8", "--mesh", "data=1", "--out",
                str(short_run)])
  assert e.value.code == 2
  line = one_error_line(capsys.readouterr().err)
  for part in ("epochs: 4 there, 8 here", "cosine schedule",
               "rerun with --epochs 4", "train 8 epochs under another --out"):
    assert part in line
  assert snapshot(short_run).keys() == before.keys()


def write_blobs(path, n=400, seed=0, dtype=None):
  """Three well separated Gaussian blobs in 5-D, as a --data file."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 3, n)
  np.savez(path, X=rng.normal(size=(n, 5)) + 3 * np.eye(3, 5)[y],
           y=y if dtype is None else y.astype(dtype))
  return path


def test_own_data_file_keeps_the_newest_checkpoint(tmp_path):
  data = write_blobs(tmp_path / "blobs.npz")
  out = tmp_path / "out"
  assert train.main(["--data", str(data), "--optimizer", "sgd", "--epochs",
                     "3", "--keep-checkpoints", "1", "--out", str(out)]) == 0
  assert metrics(out)["test_accuracy"] > 0.9
  assert [p.name for p in (out / "checkpoints").iterdir()] == [
      "epoch_0003.npz"]


@pytest.mark.slow
def test_lbfgs_run_is_extended_as_if_uninterrupted(tmp_path, capsys):
  flags = ["--optimizer", "lbfgs", "--keep-checkpoints", "0", "--data",
           str(write_blobs(tmp_path / "b.npz", n=100))]
  extended, whole = str(tmp_path / "extended"), str(tmp_path / "whole")
  assert train.main([*flags, "--epochs", "2", "--out", extended]) == 0
  assert train.main([*flags, "--epochs", "4", "--out", extended]) == 0
  assert "resuming from epoch 2" in capsys.readouterr().out
  assert train.main([*flags, "--epochs", "4", "--out", whole]) == 0
  assert metrics(tmp_path / "extended") == metrics(tmp_path / "whole")
  assert len(list((tmp_path / "extended" / "checkpoints").iterdir())) == 4
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:  # shortening it is refused
    train.main([*flags, "--epochs", "3", "--out", extended])
  assert e.value.code == 2
  assert "it holds 4 epochs, more than --epochs 3" in one_error_line(
      capsys.readouterr().err)


# ------------------------------------------------------------- bad data
def bad_data(path, case):
  """Writes one kind of unusable --data file to path."""
  rng = np.random.default_rng(0)
  X, y = rng.normal(size=(40, 3)), rng.integers(0, 3, 40)
  at = np.arange(40) == 3  # the bad row
  arrays = {
      "nan": lambda: {"X": np.where(at[:, None], np.nan, X), "y": y},
      "inf": lambda: {"X": np.where(at[:, None], -np.inf, X), "y": y},
      "float32 overflow": lambda: {"X": np.where(at[:, None], 1e39, X),
                                   "y": y},
      "int64 label 2**31+5": lambda: {
          "X": X, "y": np.where(at, 2**31 + 5, y).astype(np.int64)},
      "uint64 label 2**32": lambda: {
          "X": X, "y": np.where(at, 2**32, y).astype(np.uint64)},
      "label 1e9": lambda: {"X": rng.normal(size=(40, 64)),
                            "y": np.where(at, 10**9, y)},
      "negative label": lambda: {"X": X, "y": y - 1},
      "fractional label": lambda: {"X": X, "y": np.where(at, 0.5, y)},
      "nan label": lambda: {"X": X, "y": np.where(at, np.nan, y)},
      "string labels": lambda: {"X": X, "y": y.astype(str)},
      "object labels": lambda: {"X": X, "y": y.astype(object)},
      "wrong keys": lambda: {"features": X, "labels": y},
      "1-D X": lambda: {"X": X[:, 0], "y": y},
  }
  if case in arrays:
    kw = arrays[case]()
    np.savez(path, allow_pickle=True, **kw)
  elif case == ".npy":
    with open(path, "wb") as f:
      np.save(f, X)
  elif case == "random bytes":
    path.write_bytes(rng.bytes(2000))
  elif case == "empty":
    path.write_bytes(b"")
  elif case == "truncated zip":
    np.savez(path, X=X, y=y)
    path.write_bytes(path.read_bytes()[:300])
  return path


BAD_DATA = {
    "nan": "X holds 3 non-finite values, the first nan at row 3, column 0",
    "inf": "the first -inf at row 3, column 0",
    "float32 overflow": "X overflows float32 (row 3, column 0)",
    "int64 label 2**31+5": "label 2147483653 (row 3) is out of range",
    "uint64 label 2**32": "label 4294967296 (row 3) is out of range",
    "label 1e9": "a (64, 1000000001) float32 weight matrix of 238 GiB",
    "negative label": "negative label -1",
    "fractional label": "non-integer label 0.5 (row 3)",
    "nan label": "non-finite label nan (row 3)",
    "string labels": "y must hold integer class labels, got dtype <U",
    "object labels": "y holds Python objects (a pickle), which train.py "
                     "never loads",
    "wrong keys": "it holds arrays ['features', 'labels'], not X and y",
    "1-D X": "need X (n, d) and y (n,)",
    ".npy": "a .npy file (one array), not an .npz",
    "random bytes": "not an .npz file (no zip signature)",
    "empty": "the file is empty",
    "truncated zip": "not a readable .npz file (BadZipFile",
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data_is_refused_in_one_line(case, tmp_path, capsys):
  data = bad_data(tmp_path / "bad.npz", case)
  with pytest.raises(SystemExit) as e:
    train.main(["--data", str(data), "--out", str(tmp_path / "out")])
  assert e.value.code == 2
  line = one_error_line(capsys.readouterr().err)
  assert line.startswith(f"train.py: error: --data {data}: ")
  assert BAD_DATA[case] in line
  assert "pickle" not in line or case == "object labels"
  assert not (tmp_path / "out").exists()  # refused before anything


def test_bad_data_from_the_command_line(tmp_path):
  """The real CLI: exit 2, one line on stderr, no traceback, no usage."""
  data = bad_data(tmp_path / "bad.npz", "random bytes")
  run = subprocess.run([sys.executable, SCRIPT, "--data", data, "--out",
                        tmp_path / "out"], env=SUBPROCESS_ENV,
                       capture_output=True, text=True, timeout=120)
  assert run.returncode == 2
  assert "not an .npz file" in one_error_line(run.stderr)
  assert not (tmp_path / "out").exists()


def test_integral_float_and_sparse_labels_train_with_a_warning(tmp_path,
                                                               capsys):
  data = write_blobs(tmp_path / "b.npz", n=60, dtype=np.float64)
  with np.load(data) as f:
    np.savez(data, X=f["X"], y=f["y"] * 1000)  # labels 0.0, 1000.0, 2000.0
  out = tmp_path / "out"
  assert train.main(["--data", str(data), "--epochs", "1", "--out",
                     str(out)]) == 0
  err = capsys.readouterr().err
  assert ("y takes 3 distinct values in 0 ... 2000, so 2001 classes are "
          "trained, 1998 of them without a row") in err
  assert "train.py: warning: --data" in err


def test_data_is_known_by_its_contents_not_its_path(tmp_path, capsys):
  data = write_blobs(tmp_path / "a.npz", n=100)
  flags = ["--optimizer", "sgd", "--epochs", "2", "--out", str(tmp_path)]
  assert train.main(["--data", str(data), *flags]) == 0
  moved = tmp_path / "elsewhere" / "b.npz"
  moved.parent.mkdir()
  shutil.copy(data, moved)
  capsys.readouterr()
  assert train.main(["--data", str(moved), *flags]) == 0  # same data
  assert "is complete (2 epochs)" in capsys.readouterr().out
  write_blobs(data, n=100, seed=1)  # other contents, same path
  with pytest.raises(SystemExit) as e:
    train.main(["--data", str(data), *flags])
  assert e.value.code == 2
  line = one_error_line(capsys.readouterr().err)
  assert "it holds a run with other settings (data_sha256: " in line
  assert " there, " in line


# ------------------------------------------------------------ checkpoints
def damage(path, how):
  """Damages checkpoint file path in one of several ways."""
  raw = path.read_bytes()
  if how == "truncated":
    path.write_bytes(raw[:len(raw) // 2])
  elif how == "empty":
    path.write_bytes(b"")
  elif how == "not a zip":
    path.write_bytes(b"\0" * len(raw))
  elif how == "other zip":  # a valid .npz, but no checkpoint
    np.savez(path, x=np.zeros(3))
  elif how == "missing key":  # every other entry intact, checksum included
    with zipfile.ZipFile(path) as z:
      entries = {n: z.read(n) for n in z.namelist() if n != "params/0.npy"}
    with zipfile.ZipFile(path, "w") as z:
      for name, content in entries.items():
        z.writestr(name, content)
  elif how == "flipped bytes":  # one bit of a parameter
    with zipfile.ZipFile(path) as z:
      at = raw.index(z.read("params/0.npy")) + 200
    path.write_bytes(raw[:at] + bytes([raw[at] ^ 1]) + raw[at + 1:])
  elif how == "another step's file":
    shutil.copy(path.with_name("epoch_0003.npz"), path)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncated", "empty", "not a zip",
                                 "other zip", "missing key", "flipped bytes",
                                 "another step's file"])
def test_damaged_newest_checkpoint_is_skipped(short_run, tmp_path, capsys,
                                              how):
  out = copy_run(short_run, tmp_path / "run")
  newest = out / "checkpoints" / "epoch_0004.npz"
  damage(newest, how)
  assert train.main([*SHORT, "--out", str(out)]) == 0
  printed = capsys.readouterr()
  assert "skipped damaged checkpoint epoch_0004.npz (" in printed.err
  assert "renamed epoch_0004.npz.corrupt" in printed.err
  assert "resuming from epoch 3" in printed.out
  assert metrics(out) == metrics(short_run)  # where the full run ended
  with (np.load(newest) as a,
        np.load(short_run / "checkpoints" / "epoch_0004.npz") as b):
    assert a.files == b.files
    for key in a.files:
      np.testing.assert_array_equal(a[key], b[key], strict=True)
  assert newest.with_name("epoch_0004.npz.corrupt").exists()
  assert train.main([*SHORT, "--out", str(out)]) == 0  # nothing to skip now
  printed = capsys.readouterr()
  assert "is complete" in printed.out and not printed.err


def test_stray_files_beside_checkpoints_are_ignored(short_run, tmp_path,
                                                    capsys):
  out = copy_run(short_run, tmp_path / "run")
  ckpts = out / "checkpoints"
  shutil.copy(ckpts / "epoch_0004.npz", ckpts / "epoch_0001 (copy).npz")
  (ckpts / "epoch_0009.npz.bak").write_bytes(b"junk")
  (ckpts / "epoch_0010.NPZ").write_bytes(b"junk")
  assert train.main([*SHORT, "--out", str(out)]) == 0
  printed = capsys.readouterr()
  assert "is complete (4 epochs)" in printed.out and not printed.err


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


@pytest.mark.slow
def test_locked_run_refuses_a_second_and_resumes_after_sigkill(tmp_path,
                                                               spawn):
  flags = ["--model", "mlp", "--hidden", "16", "--epochs", "3",
           "--batch-size", "31", "--data", write_blobs(tmp_path / "b.npz")]
  full, killed = tmp_path / "full", tmp_path / "killed"
  uninterrupted = spawn(SCRIPT, *flags, "--out", full)
  victim = spawn("-c", HOLD_AFTER_FIRST_EPOCH, SCRIPT, *flags, "--out",
                 killed)
  deadline = time.monotonic() + 120
  while not (killed / "metrics.json").exists():  # the epoch's last file
    assert victim.poll() is None, "the run ended before its first epoch"
    assert time.monotonic() < deadline
    time.sleep(0.05)
  # curves.png is drawn after the first epoch, not only at the end.
  assert (killed / "curves.png").read_bytes()[:4] == b"\x89PNG"
  # As if the holder were mid-way through writing its next checkpoint.
  in_flight = killed / "checkpoints" / "epoch_0002.npz.x1y2.tmp"
  in_flight.write_bytes(b"PK\3")

  second = subprocess.run(
      [sys.executable, SCRIPT, *flags, "--out", killed], env=SUBPROCESS_ENV,
      capture_output=True, text=True, timeout=120)
  assert second.returncode == 2
  assert f"another run (pid {victim.pid}) holds its lock" in one_error_line(
      second.stderr)
  assert in_flight.exists()  # the refused run deleted nothing

  victim.kill()  # SIGKILL: the kernel drops its lock
  assert victim.wait() == -9
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


@pytest.mark.slow
def test_full_disk_fails_in_one_line_and_resumes(short_run, tmp_path, capsys):
  out = tmp_path / "run"
  run = subprocess.run(
      [sys.executable, "-c", DISK_FULL_AT_EPOCH_3, SCRIPT, *SHORT, "--out",
       out], env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
  assert run.returncode == 1, run.stderr[-2000:]
  err = [line for line in run.stderr.splitlines()
         if not line.startswith("epoch ")]  # tqdm's bars aside
  line = one_error_line("\n".join(err))
  assert f"cannot write {out}/checkpoints/epoch_0003.npz: No space left" in (
      line)
  assert "the checkpoints up to epoch 2 are intact" in line
  assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
      "epoch_0001.npz", "epoch_0002.npz"]
  reader = rundir.RunDir(out, {}, prefix="epoch", width=4, writer=False)
  assert [reader.load(p).step for _, p in reader.checkpoints()] == [1, 2]
  assert train.main([*SHORT, "--out", str(out)]) == 0
  assert "resuming from epoch 2" in capsys.readouterr().out
  assert metrics(out) == metrics(short_run)


def as_unprivileged(command):
  """command, run so that file permissions apply even to root: root drops
  CAP_DAC_OVERRIDE (setpriv), others run it as it is."""
  if os.geteuid() != 0:
    return command
  if shutil.which("setpriv") is None:
    pytest.skip("running as root, and no setpriv to drop CAP_DAC_OVERRIDE")
  return ["setpriv", "--inh-caps=-dac_override",
          "--bounding-set=-dac_override", *command]


def read_only(path):
  for p in [path, *path.rglob("*")]:
    p.chmod(0o555 if p.is_dir() else 0o444)


@pytest.mark.slow
def test_read_only_run_directory(short_run, tmp_path):
  done = copy_run(short_run, tmp_path / "done")
  unfinished = copy_run(short_run, tmp_path / "unfinished")
  (unfinished / "checkpoints" / "epoch_0004.npz").unlink()
  empty = tmp_path / "empty"
  empty.mkdir()
  for path in (done, unfinished, empty):
    read_only(path)
  before = snapshot(done)

  def train_in(out):
    return subprocess.run(
        as_unprivileged([sys.executable, str(SCRIPT), *SHORT, "--out",
                         str(out)]),
        env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)

  try:
    complete = train_in(done)  # reported, not rewritten
    assert complete.returncode == 0, complete.stderr
    assert "is complete (4 epochs)" in complete.stdout
    assert snapshot(done) == before
    refused = train_in(unfinished)  # refused before any epoch
    assert refused.returncode == 2
    assert (f"--out {unfinished}: {unfinished} is not writable (Permission "
            "denied)") in one_error_line(refused.stderr)
    fresh = train_in(empty / "new")
    assert fresh.returncode == 2
    assert (f"cannot create {empty}/new/checkpoints: Permission denied"
            in one_error_line(fresh.stderr))
  finally:
    for path in (done, unfinished, empty):
      for p in [path, *path.rglob("*")]:
        p.chmod(0o755)


# ------------------------------------------------------------- rundir API
def test_rundir_saves_and_restores_any_trees(tmp_path):
  """The generic API a second trainer uses: named leaf lists, meta, free
  keys, pruning, the config check and the templates check."""
  config = {"lr": 0.1, "steps": 10, "data_sha256": rundir.fingerprint(
      {"tokens": np.arange(5)})}
  leaves = {"params": [np.ones((2, 3), np.float32), np.float32(2)],
            "opt": [np.int32(7), np.arange(4).astype(jax.numpy.bfloat16),
                    np.zeros(0, np.float16)]}
  with rundir.RunDir(tmp_path, config, keep=2) as run:
    assert run.restore(leaves) is None
    for step in (100, 200, 300):
      run.save(step, leaves, {"losses": [0.1, 1 / 3], "step": step})
    assert [s for s, _ in run.checkpoints()] == [200, 300]
    assert run.write_if_changed("notes.txt", b"x")
    assert not run.write_if_changed("notes.txt", b"x")
    with pytest.raises(rundir.RunDirError, match="another run"):
      rundir.RunDir(tmp_path, config).open()
    reader = rundir.RunDir(tmp_path, config, writer=False).open()  # no lock
    assert reader.restore().step == 300 and not reader.writable
  with rundir.RunDir(tmp_path, {**config, "steps": 20},
                     free=("steps",)) as run:
    ckpt = run.restore(leaves)
    assert ckpt.step == 300 and ckpt.meta == {"losses": [0.1, 1 / 3],
                                              "step": 300}
    for name, saved in leaves.items():
      for a, b in zip(ckpt.trees[name], saved, strict=True):
        np.testing.assert_array_equal(a, b, strict=True)
    with pytest.raises(rundir.RunDirError, match="do not match"):
      run.restore({"params": leaves["params"][:1]})
  with rundir.RunDir(tmp_path, {**config, "lr": 0.2}) as run:
    with pytest.raises(rundir.ConfigMismatch) as e:
      run.restore()
    assert e.value.changed == {"lr": (0.1, 0.2)}
    assert e.value.step == 300


def test_another_programs_run_directory_is_refused(tmp_path, capsys):
  """train_lm.py's checkpoints (step_*.npz) in --out: train.py would
  write its own beside them and overwrite metrics.json and curves.png."""
  with rundir.RunDir(tmp_path, {"steps": 2}, prefix="step") as run:
    run.save(2, {"params": [np.ones(3, np.float32)]})
  (tmp_path / "metrics.json").write_text("{}")
  with pytest.raises(SystemExit) as e:
    train.main([*SHORT, "--out", str(tmp_path)])
  assert e.value.code == 2
  assert "another program's checkpoints (step_00000002.npz" in (
      one_error_line(capsys.readouterr().err))
  assert (tmp_path / "metrics.json").read_text() == "{}"
  assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [
      "step_00000002.npz"]
  with rundir.RunDir(tmp_path, {"epochs": 4}, prefix="epoch") as run, \
       pytest.raises(rundir.RunDirError, match="another program's"):
    run.restore()


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


@pytest.mark.parametrize("script", ["train.py", "train_lm.py"])
def test_distributed_without_a_cluster_exits_2(script, tmp_path):
  # --process-id alone once compared an int with None (a traceback);
  # jax.distributed.initialize must be the process's first JAX call, so
  # this runs in a fresh process.
  done = subprocess.run(
      [sys.executable, str(SCRIPTS / script), "--distributed",
       "--process-id", "1", "--out", str(tmp_path / "run")],
      env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
  assert done.returncode == 2, done.stderr
  assert done.stderr.strip().splitlines()[-1] == (
      f"{script}: error: jax.distributed.initialize: "
      "coordinator_address should be defined.")
  assert not (tmp_path / "run").exists()


def test_too_many_devices_message_counts_them(tmp_path, capsys):
  n = len(jax.devices())
  with pytest.raises(SystemExit):
    train.main(["--mesh", f"data={n + 1}", "--out", str(tmp_path)])
  noun = "device" if n == 1 else "devices"
  assert capsys.readouterr().err.endswith(f": only {n} {noun}\n")


def test_help_explains_every_flag(capsys):
  with pytest.raises(SystemExit) as e:
    train.main(["--help"])
  assert e.value.code == 0
  text = capsys.readouterr().out
  for action in train.build_parser()._actions:
    assert action.help, action.option_strings
    assert action.option_strings[-1] in text


@pytest.mark.slow
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
