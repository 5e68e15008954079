"""Tests of scripts/train_lm.py: tiny runs in subprocesses (fused and optax
heads, kill-and-resume, a single --text file, two processes), flags."""

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
SCRIPT = SCRIPTS / "train_lm.py"
ROOT = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))  # train_lm.py imports rundir, _common
_spec = importlib.util.spec_from_file_location("train_lm", SCRIPT)
lm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lm)

METRIC_KEYS = {"history", "eval_loss", "vocab_size", "tokens_per_second",
               "head_temp_bytes", "backend", "config", "train_loss",
               "steps_completed", "sample", "log_vocab"}
TIMING_KEYS = {"tokens_per_second"}  # the only values a resume may change

# Runs the script, but holds each process after its first checkpoint so the
# test's SIGKILL lands mid-run rather than racing the end of training.
HOLD_AFTER_CHECKPOINT = """
import importlib.util, sys, time
sys.path.insert(0, sys.argv[1])
spec = importlib.util.spec_from_file_location("train_lm", sys.argv[2])
lm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lm)
save = lm.save_checkpoint
def save_and_hold(*args):
    save(*args)
    time.sleep(600)
lm.save_checkpoint = save_and_hold
lm.main(sys.argv[3:])
"""

WORDS = ("alpha beta gamma delta the a of to in is was for on with as "
         "model loss token head layer step train").split()


def write_corpus(root: Path, files=6, lines=60) -> Path:
  """Small text files of a made-up language with a little structure."""
  rng = np.random.default_rng(0)
  root.mkdir()
  for i in range(files):
    text = "".join(
        " ".join(rng.choice(WORDS, rng.integers(4, 10))) + ".\n"
        for _ in range(lines))
    (root / f"doc{i}.txt").write_text(text)
  return root


def tiny(corpus, *extra, steps=3):
  return ["--text", str(corpus), "--vocab-size", "300", "--d-model", "32",
          "--layers", "1", "--heads", "2", "--seq-len", "32",
          "--batch-size", "8", "--steps", str(steps), "--eval-every", "2",
          "--checkpoint-every", "1", "--sample-tokens", "8", *extra]



def env(devices=2):
  """Subprocess environment: CPU with `devices` simulated devices (2: the
  batches really are split over "data"), importing this checkout's
  jax_softmax whatever is installed."""
  path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
  return {**os.environ, "JAX_PLATFORMS": "cpu",
          "TOKENIZERS_PARALLELISM": "false",
          "PYTHONPATH": os.pathsep.join(path),
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def metrics(out):
  return json.loads((out / "metrics.json").read_text())


def untimed(m):
  return {k: v for k, v in m.items() if k not in TIMING_KEYS}


class Spawn:
  """Starts python subprocesses; kills any still running at teardown."""

  def __init__(self):
    self.procs = []

  def __call__(self, *args, devices=2, quiet=False):
    self.procs.append(subprocess.Popen(
        [sys.executable, *map(str, args)], env=env(devices),
        stdout=subprocess.DEVNULL if quiet else subprocess.PIPE,
        stderr=subprocess.DEVNULL if quiet else subprocess.PIPE, text=True))
    return self.procs[-1]

  def finish(self, proc, timeout=300):
    stdout, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, stderr[-3000:]
    return stdout

  def kill_all(self):
    for proc in self.procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def spawn_module():
  s = Spawn()
  yield s
  s.kill_all()


@pytest.fixture
def spawn():
  s = Spawn()
  yield s
  s.kill_all()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp("text") / "corpus")


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory, spawn_module):
  """3-step runs of the fused and the optax head, side by side."""
  root = tmp_path_factory.mktemp("runs")
  procs = {head: spawn_module(SCRIPT, *tiny(corpus, "--head", head),
                              "--out", root / head)
           for head in ("fused", "optax")}
  stdout = {head: spawn_module.finish(p) for head, p in procs.items()}
  return {head: (root / head, stdout[head]) for head in procs}


@pytest.mark.slow
def test_short_run_writes_metrics_curves_tokenizer_checkpoints(runs):
  out, stdout = runs["fused"]
  m = metrics(out)
  assert METRIC_KEYS <= m.keys()
  assert [e["step"] for e in m["history"]] == [1, 2, 3]
  assert all({"train_loss", "lr", "grad_norm"} <= e.keys()
             for e in m["history"])
  assert [("eval_loss" in e) for e in m["history"]] == [False, True, True]
  assert m["eval_loss"] == m["history"][-1]["eval_loss"]
  assert m["steps_completed"] == 3 and m["backend"] == "cpu"
  assert m["config"]["head"] == "fused" and m["config"]["devices"] == 2
  assert m["config"]["batch_size"] == 8
  # the BPE's vocabulary, as requested, and the loss of a uniform guess
  from tokenizers import Tokenizer
  tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
  assert m["vocab_size"] == tokenizer.get_vocab_size() == 300
  assert m["log_vocab"] == pytest.approx(math.log(300))
  # the tied embedding starts near uniform, then learns
  assert abs(m["history"][0]["train_loss"] - math.log(300)) < 0.05
  assert m["history"][-1]["train_loss"] < m["history"][0]["train_loss"]
  assert m["eval_loss"] < math.log(300)
  assert m["tokens_per_second"] > 0
  assert m["head_temp_bytes"]["fused"] > 0
  assert m["head_temp_bytes"]["optax"] > 0
  assert isinstance(m["sample"], str) and m["sample"] in stdout
  assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  names = sorted(p.name for p in (out / "checkpoints").iterdir())
  assert names == [f"step_{s:08d}.npz" for s in (1, 2, 3)]
  assert "5 train files" in stdout and "1 held out" in stdout
  assert "head memory" in stdout and "optax" in stdout


@pytest.mark.slow
def test_fused_and_optax_heads_agree(runs):
  fused, optax = (metrics(runs[h][0]) for h in ("fused", "optax"))
  assert optax["config"]["head"] == "optax"
  first = fused["history"][0], optax["history"][0]
  # Step 1: the same parameters, so the same loss and gradient (float32).
  assert first[0]["train_loss"] == pytest.approx(first[1]["train_loss"],
                                                 rel=1e-6)
  assert first[0]["grad_norm"] == pytest.approx(first[1]["grad_norm"],
                                                rel=1e-4)
  for a, b in zip(fused["history"], optax["history"], strict=True):
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
  assert fused["eval_loss"] == pytest.approx(optax["eval_loss"], rel=1e-4)


@pytest.mark.slow
def test_locked_run_directory_is_refused(single_run, capsys):
  import rundir

  text, out, _ = single_run
  with rundir.RunDir(out, {}):  # another run holds the lock
    with pytest.raises(SystemExit) as e:
      lm.main([*tiny(text, steps=2), "--out", str(out)])
  assert e.value.code == 2
  assert "holds its lock" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(runs, corpus,
                                                        tmp_path, spawn):
  """The fused run of `runs` is the uninterrupted one."""
  full, killed = runs["fused"][0], tmp_path / "killed"
  victim = spawn("-c", HOLD_AFTER_CHECKPOINT, SCRIPTS, SCRIPT, *tiny(corpus),
                 "--out", killed, quiet=True)
  deadline = time.monotonic() + 120
  while not (killed / "checkpoints" / "step_00000001.npz").exists():
    assert victim.poll() is None, "the run ended before its checkpoint"
    assert time.monotonic() < deadline
    time.sleep(0.05)
  victim.kill()  # SIGKILL
  assert victim.wait() == -9
  # What a SIGKILL in the middle of writing the next checkpoint leaves.
  (killed / "checkpoints" / "step_00000002.npz.x1y2.tmp").write_bytes(b"PK")

  stdout = spawn.finish(spawn(SCRIPT, *tiny(corpus), "--out", killed))
  assert "resuming from step 1" in stdout
  assert untimed(metrics(killed)) == untimed(metrics(full))
  assert (killed / "tokenizer.json").read_bytes() == \
      (full / "tokenizer.json").read_bytes()
  name = "checkpoints/step_00000003.npz"
  with np.load(full / name) as a, np.load(killed / name) as b:
    arrays = [k for k in a.files if not k.startswith("__")]
    assert arrays == [k for k in b.files if not k.startswith("__")]
    assert any(k.startswith("opt_state/") for k in arrays)
    for key in arrays:  # parameters and optimizer state, bit for bit
      np.testing.assert_array_equal(a[key], b[key], strict=True)
  assert not list(killed.glob("**/*.tmp"))


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, spawn_module):
  """A 2-step run on one device on a single --text file."""
  root = tmp_path_factory.mktemp("single")
  docs = write_corpus(root / "docs", files=2)
  text = root / "notes.txt"
  text.write_text("".join(p.read_text() for p in sorted(docs.iterdir())))
  out = root / "out"
  stdout = spawn_module.finish(spawn_module(
      SCRIPT, *tiny(text, steps=2), "--out", out, devices=1))
  return text, out, stdout


@pytest.mark.slow
def test_single_text_file_is_cut_into_pieces(single_run):
  text, out, stdout = single_run
  assert "9 train files" in stdout and "1 held out" in stdout
  m = metrics(out)
  assert m["config"]["data"] == str(text)
  assert m["config"]["devices"] == 1
  assert m["steps_completed"] == 2 and m["eval_tokens"] > 0
  assert m["train_tokens"] > 5 * m["eval_tokens"]
  assert m["eval_loss"] < m["log_vocab"]


@pytest.mark.slow
def test_rerun_of_finished_run_says_complete(single_run, capsys):
  text, out, _ = single_run
  before = (out / "metrics.json").read_bytes()
  assert lm.main([*tiny(text, steps=2), "--out", str(out)]) == 0
  assert "is complete (2 steps)" in capsys.readouterr().out
  assert (out / "metrics.json").read_bytes() == before


@pytest.mark.slow
@pytest.mark.parametrize("flags, message", [
    (["--lr", "0.5"], "(lr: 0.003 there, 0.5 here)"),
    (["--head", "optax"], "(head: fused there, optax here)"),
    (["--steps", "5"], "(steps: 2 there, 5 here)"),
])
def test_resume_with_other_settings_is_refused(single_run, capsys, flags,
                                               message):
  text, out, _ = single_run
  with pytest.raises(SystemExit) as e:
    lm.main([*tiny(text, steps=2), *flags, "--out", str(out)])
  assert e.value.code == 2
  assert message in capsys.readouterr().err


@pytest.mark.slow
def test_other_data_is_refused(single_run, tmp_path, capsys):
  """The corpus is known by its contents: a moved copy resumes, an edited
  one is refused."""
  text, out, _ = single_run
  moved = tmp_path / "moved.txt"
  moved.write_text(text.read_text())
  assert lm.main([*tiny(moved, steps=2), "--out", str(out)]) == 0
  assert "is complete" in capsys.readouterr().out
  moved.write_text(text.read_text() + "one more line.\n")
  with pytest.raises(SystemExit) as e:
    lm.main([*tiny(moved, steps=2), "--out", str(out)])
  assert e.value.code == 2
  assert "data_sha256: " in capsys.readouterr().err


def test_text_corpus_reads_a_directory(tmp_path):
  root = write_corpus(tmp_path / "c", files=3)
  (root / "sub").mkdir()
  (root / "sub" / "more.md").write_text("more text\n")
  (root / ".hidden.txt").write_text("not read\n")
  (root / "image.bin").write_bytes(b"\xff\xfe\x00\x81")
  corpus = lm.text_corpus(root)
  assert corpus.names == ["doc0.txt", "doc1.txt", "doc2.txt", "sub/more.md"]
  assert corpus.skipped == 1
  assert corpus.texts[3] == "more text\n"
  moved = tmp_path / "moved"
  root.rename(moved)  # the fingerprint is of names and contents, not path
  assert lm.text_corpus(moved).fingerprint() == corpus.fingerprint()
  (moved / "doc0.txt").write_text("changed\n")
  assert lm.text_corpus(moved).fingerprint() != corpus.fingerprint()


def test_default_corpus_is_the_stdlib_subset():
  corpus = lm.stdlib_corpus()
  assert len(corpus.names) == len(lm.DEFAULT_MODULES) == 52
  assert corpus.names[0] == "argparse.py"
  assert "class ArgumentParser" in corpus.texts[0]
  train, held_out = lm.split_documents(len(corpus.names))
  assert len(held_out) == 5 and len(train) == 47
  assert not set(train) & set(held_out)
  # fixed: the same split every time
  assert list(held_out) == list(lm.split_documents(52)[1])


def test_rows_pad_each_file_with_ignored_targets():
  class Encoding:
    def __init__(self, ids):
      self.ids = ids

  class Tokenizer:  # ids of a text: its characters' ordinals
    def token_to_id(self, token):
      return 0

    def encode_batch(self, texts):
      return [Encoding([ord(c) for c in t]) for t in texts]

  x, y = lm.to_rows(Tokenizer(), ["abcde", "xy"], seq_len=4)
  a, b, c, d, e, xx, yy = (ord(ch) for ch in "abcdexy")
  np.testing.assert_array_equal(x, [[0, a, b, c], [d, e, 0, 0],
                                    [0, xx, yy, 0]])
  np.testing.assert_array_equal(y, [[a, b, c, d], [e, 0, -100, -100],
                                    [xx, yy, 0, -100]])


def test_batches_are_a_stream_of_permutations():
  rows = np.concatenate([lm.batch_rows(s, 4, 10, seed=3)
                         for s in range(1, 6)])
  for epoch in range(2):  # every row once per pass over the data
    assert sorted(rows[10 * epoch:10 * epoch + 10]) == list(range(10))
  np.testing.assert_array_equal(rows[:4], lm.batch_rows(1, 4, 10, seed=3))
  assert list(rows[:10]) != list(np.concatenate(
      [lm.batch_rows(s, 4, 10, seed=4) for s in range(1, 4)])[:10])


def test_fused_head_memory_follows_its_chunk_not_the_logits():
  """One value_and_grad of optax's head holds the (B, T, V) logits; the
  fused head's temporaries scale with its chunk of rows."""
  import jax
  from jax.sharding import AxisType

  mesh = jax.make_mesh((1, 1), ("data", "model"),
                       axis_types=(AxisType.Explicit,) * 2)
  batch, seq_len, d, vocab = 8, 128, 32, 8192
  logits = batch * seq_len * vocab * 4  # 32 MiB

  def temp(head, chunk=None):
    return lm.head_temp_bytes(lm.make_head(head, chunk, mesh, False), mesh,
                              batch, seq_len, d, vocab, 1e-4)
  temps = {"fused": temp("fused", 64), "optax": temp("optax")}
  assert temps["optax"] >= logits
  assert temps["fused"] < logits / 2
  assert temp("fused", 256) > 2 * temps["fused"]
  table = lm.memory_table(temps, batch, seq_len, d, vocab, 1)
  assert "the logits alone: 32.0 MiB" in table
  assert f"optax / fused: {temps['optax'] / temps['fused']:.1f}x" in table


def test_memory_only_prints_the_table_and_writes_nothing(tmp_path,
                                                        monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  assert lm.main(["--memory-only", "--vocab-size", "4096", "--d-model",
                  "32", "--seq-len", "64", "--batch-size", "8"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert "h (8, 64, 32), E (4096, 32)" in lines[1]
  assert "the logits alone: 8.0 MiB" in lines[1]
  fused, optax = (float(line.split()[1].replace(",", ""))
                  for line in lines[2:4])
  assert lines[2].split()[0] == "fused" and lines[3].split()[0] == "optax"
  assert optax >= 8.0 and fused > 0
  assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_two_processes_match_one_process_on_as_many_devices(runs, corpus,
                                                            tmp_path, spawn):
  """Two processes of 1 device each (jax.distributed, gloo on loopback)
  train exactly as the fused run of `runs`, one process with 2 devices."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  out = tmp_path / "multi"
  workers = [spawn(SCRIPT, *tiny(corpus), "--out", out,
                   "--coordinator-address", f"127.0.0.1:{port}",
                   "--num-processes", "2", "--process-id", i, devices=1)
             for i in range(2)]
  stdout = [spawn.finish(w) for w in workers]
  assert "held-out loss" in stdout[0] and "resuming" not in stdout[0]
  multi, single = metrics(out), metrics(runs["fused"][0])
  assert multi["config"] == single["config"]
  assert multi["config"]["devices"] == 2
  for a, b in zip(multi["history"], single["history"], strict=True):
    assert a.keys() == b.keys()
    for key in a:
      assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
  assert multi["sample"] == single["sample"]
  assert sorted(p.name for p in out.iterdir()) == [
      ".lock", "checkpoints", "curves.png", "metrics.json", "tokenizer.json"]


@pytest.mark.slow
def test_vocab_parallel_head_matches_data_parallel(runs, corpus, tmp_path,
                                                  spawn):
  """E split on V over model=2 (axis_name inside shard_map) trains as the
  data-parallel run on the same data=2 (4 devices in all)."""
  out = tmp_path / "vp"
  stdout = spawn.finish(spawn(SCRIPT, *tiny(corpus), "--vocab-parallel",
                              "--mesh", "data=2,model=2", "--out", out,
                              devices=4))
  assert "mesh data=2, model=2" in stdout
  vp, dp = metrics(out), metrics(runs["fused"][0])
  assert vp["config"]["vocab_parallel"] == 2 and vp["devices"] == 4
  assert {**vp["config"], "vocab_parallel": None} == dp["config"]
  for a, b in zip(vp["history"], dp["history"], strict=True):
    for key in a:
      assert a[key] == pytest.approx(b[key], rel=1e-5), key


@pytest.mark.parametrize("argv", [
    ["--head", "linear"],
    ["--heads", "3"],  # does not divide --d-model 128
    ["--vocab-size", "100"],
    ["--lr", "0"],
    ["--steps", "0"],
    ["--seq-len", "ten"],
    ["--z-loss", "-1"],
    ["--mesh", "data=0"],
    ["--mesh", "model=2"],  # without --vocab-parallel
    ["--mesh", "data=1000"],
    ["--mesh", "pipe=2"],
    ["--vocab-parallel", "--head", "optax"],
    ["--vocab-parallel", "--mesh", "data=1,model=3"],  # 8192 % 3 != 0
    ["--text", "no/such/dir"],
    ["--num-processes", "2"],
    ["--bogus"],
])
def test_bad_flags_exit_2(argv, tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    lm.main([*argv, "--out", str(tmp_path)])
  assert e.value.code == 2
  assert "error:" in capsys.readouterr().err


def test_help_explains_every_flag(capsys):
  with pytest.raises(SystemExit) as e:
    lm.main(["--help"])
  assert e.value.code == 0
  text = capsys.readouterr().out
  for action in lm.build_parser()._actions:
    assert action.help, action.option_strings
    assert action.option_strings[-1] in text
