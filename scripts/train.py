"""Train a softmax classifier with optax; resumable, data-parallel.

    python scripts/train.py                       # linear model on digits
    python scripts/train.py --model mlp --out runs/mlp

Data: scikit-learn's bundled ``load_digits`` (no download) or ``--data
FILE.npz`` (arrays ``X`` ``(n, d)`` and ``y`` ``(n,)``), split 75/25 with a
fixed seed and standardized with the training split's statistics. Models:
``linear`` (``jax_softmax.linear_softmax_loss``, the seed's ``W`` of shape
``(d, classes)``) or ``mlp`` (one ReLU hidden layer, loss through
``jax_softmax.cross_entropy``); ``--reg`` adds ``reg * sum(W**2)`` over the
weight matrices. Batches are sharded over a 1-D mesh axis ``"data"``; the
last batch is padded to the full batch size and its padded rows are masked
out through ``where``, so every step's loss is the exact mean over real rows
and one program is compiled. ``adam`` and ``sgd`` decay the learning rate
to 0 on a cosine schedule; ``lbfgs`` works on the full training set and
counts one iteration as an epoch.

``--out`` is a run directory (``scripts/rundir.py``, which this script
imports from its own directory, as it does ``_common.py``, the helpers it
shares with ``train_lm.py``): ``metrics.json`` (rewritten after every
epoch), ``curves.png`` (redrawn after the first and last epochs and in
between as often as keeps plotting under ~10% of the time),
``checkpoints/epoch_NNNN.npz`` (the ``--keep-checkpoints`` newest) and
``.lock``. ``train_loss`` and ``test_loss`` are the mean cross-entropy over
the whole split after each epoch, without the ``--reg`` term.

Before any training, ``--data`` is validated (``load_data``): an .npz
(never unpickled) holding finite real ``X (n, d)`` and integer labels ``y
(n,)`` (integral floats are accepted), at most ``MAX_LABEL``, whose output
layer fits in ``MAX_WEIGHT_BYTES``; labels with unused classes in their
range draw a warning. The run directory is locked, and a run there is
resumed only if it has this run's config, in which the data are known by a
SHA-256 fingerprint of ``X`` and ``y`` (not by their path); adam and sgd
runs cannot change ``--epochs`` (their cosine schedule spans it), lbfgs
runs can be extended. Exit status: 0 done (or already complete), 2
refused before training with one line on stderr (bad flags, data or run
directory), 1 failed during training (a write failed, a full disk: the
checkpoints written before stay loadable).

Checkpoint format (``rundir.RunDir.save``): one ``.npz`` per epoch holding
the parameter and optimizer-state leaves (flattened with ``jax.tree``, in
tree order; the tree structure is rebuilt from a fresh ``init`` of the same
model and optimizer), the epoch, the config, the metric history and a
SHA-256 checksum of all of them; the newest checkpoint that verifies is
resumed from. Why not orbax-checkpoint: the state is a few small arrays on
one host, and npz needs no dependency beyond NumPy, stores each array's raw
bytes (float32 parameters and optimizer moments come back bit for bit, so a
resumed run ends with exactly the metrics of an uninterrupted one), and
fits in a single file, which makes it atomic: it is written to a temporary
file in the same directory, fsynced, then ``os.replace``d onto its final
name, so a kill at any moment, even mid-write, leaves either the previous
checkpoints or the complete new one. Data order is a pure function of
``(seed, epoch)``, so no RNG state needs saving.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zipfile
from pathlib import Path
from typing import NamedTuple, NoReturn

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import (
  NON_NEGATIVE_FLOAT,
  NON_NEGATIVE_INT,
  POSITIVE_FLOAT,
  POSITIVE_INT,
  add_multiprocess_args,
  init_distributed,
  local_rows,
  strong,
  to_host,
)
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from rundir import ConfigMismatch, RunDir, RunDirError, fingerprint
from tqdm import tqdm

from jax_softmax import cross_entropy, linear_softmax_loss

DEFAULT_LR = {"adam": 0.03, "sgd": 0.1, "lbfgs": 1.0}
SPLIT_SEED = 0
TEST_FRACTION = 0.25
MAX_WEIGHT_BYTES = 1 << 30  # the (width, classes) float32 output layer
MAX_LABEL = 2**31 - 2  # classes = max label + 1 must fit in int32
HISTORY_KEYS = ("train_loss", "train_accuracy", "train_entropy", "test_loss",
                "test_accuracy", "test_entropy")


# ----------------------------------------------------------------- flags


def _mesh(text):
  name, _, size = text.partition("=")
  if name != "data" or not size.isdigit() or int(size) < 1:
    raise argparse.ArgumentTypeError(
        f"expected data=N with N >= 1, got {text!r}")
  return int(size)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="train.py",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description="""\
Train a softmax classifier (linear, or one hidden layer) with optax on
scikit-learn's digits data or your own, on whatever backend JAX finds, with
batches sharded over the local devices. Writes metrics.json, curves.png and
a checkpoint per epoch (keeping the newest) to --out. Rerunning the same
command with the same --out resumes a killed run from its newest intact
checkpoint, or reports a finished one as complete. Exit status: 2 when
refused before training (flags, data, run directory), 1 when training
fails (a full disk).""",
      epilog="""\
examples:
  python scripts/train.py                          # linear model, digits
  python scripts/train.py --model mlp --out runs/mlp
  python scripts/train.py --optimizer lbfgs --epochs 100
  python scripts/train.py --data my.npz --mesh data=2""")
  parser.add_argument(
      "--model", choices=("linear", "mlp"), default="linear",
      help="linear: logits X @ W, loss jax_softmax.linear_softmax_loss; "
      "mlp: one ReLU hidden layer of --hidden units, loss "
      "jax_softmax.cross_entropy (default: %(default)s)")
  parser.add_argument(
      "--optimizer", choices=("adam", "sgd", "lbfgs"), default="adam",
      help="optax optimizer. adam, and sgd with momentum 0.9, take "
      "minibatches with the learning rate decayed to 0 on a cosine "
      "schedule; lbfgs takes the full training split with a zoom line "
      "search, one iteration per epoch (default: %(default)s)")
  parser.add_argument(
      "--lr", type=POSITIVE_FLOAT, default=None,
      help="(peak) learning rate (default: " + ", ".join(
          f"{v:g} for {k}" for k, v in DEFAULT_LR.items()) + ")")
  parser.add_argument(
      "--epochs", type=POSITIVE_INT, default=50,
      help="passes over the training split (default: %(default)s)")
  parser.add_argument(
      "--batch-size", type=POSITIVE_INT, default=128,
      help="rows per step, rounded up to a multiple of the device count; "
      "the last batch is padded and its padding masked (default: "
      "%(default)s)")
  parser.add_argument(
      "--seed", type=NON_NEGATIVE_INT, default=0,
      help="seeds the initial parameters and each epoch's data order; the "
      "train/test split is fixed (default: %(default)s)")
  parser.add_argument(
      "--reg", type=NON_NEGATIVE_FLOAT, default=1e-3,
      help="L2 penalty reg * sum(W**2) over the weight matrices (not the "
      "biases) (default: %(default)s)")
  parser.add_argument(
      "--hidden", type=POSITIVE_INT, default=128,
      help="hidden units of --model mlp (default: %(default)s)")
  parser.add_argument(
      "--data", type=Path, default=None, metavar="FILE.npz",
      help="train on FILE.npz, arrays X (n, d) (finite) and integer "
      "labels y (n,) in [0, classes), checked before training and known "
      "to a run by their SHA-256, not the path; split 75/25 like the "
      "default, scikit-learn's digits (1797 8x8 images, 10 classes)")
  parser.add_argument(
      "--out", type=Path, default=None, metavar="DIR",
      help="run directory, locked while a run uses it; a run already "
      "there with the same settings and data is resumed from its newest "
      "intact checkpoint, or reported complete (default: "
      "runs/<timestamp>)")
  parser.add_argument(
      "--keep-checkpoints", type=NON_NEGATIVE_INT, default=3, metavar="N",
      help="keep the N newest checkpoints, 0 for all (default: %(default)s)")
  parser.add_argument(
      "--mesh", type=_mesh, default=None, metavar="data=N",
      help="shard each batch over the first N devices, a 1-D mesh with "
      "axis 'data' (default: all devices, of every process when launched "
      "multi-process)")
  add_multiprocess_args(parser)
  return parser


# ------------------------------------------------------------------ data
class DataError(ValueError):
  """--data cannot be trained on; the message is one line for a user."""


class Data(NamedTuple):
  """Standardized splits, the class count, the raw arrays' fingerprint and
  an optional warning about the labels."""
  X_train: np.ndarray
  y_train: np.ndarray
  X_test: np.ndarray
  y_test: np.ndarray
  classes: int
  fingerprint: str
  warning: str | None


SAVE_HINT = "save the arrays with np.savez(FILE, X=X, y=y)"


def read_npz(path: Path) -> dict[str, np.ndarray]:
  """Arrays X and y of an .npz file, read without ever unpickling.

  The file must start with the zip signature (a .npy file or random bytes
  is refused before NumPy looks at it), and an array of Python objects is
  refused from its header. Raises DataError or OSError.
  """
  with open(path, "rb") as f:
    magic = f.read(6)
  if not magic:
    raise DataError(f"the file is empty; {SAVE_HINT}")
  if magic == b"\x93NUMPY":
    raise DataError(f"a .npy file (one array), not an .npz; {SAVE_HINT}")
  if not magic.startswith(b"PK"):
    raise DataError(f"not an .npz file (no zip signature); {SAVE_HINT}")
  try:
    with zipfile.ZipFile(path) as z:
      names = sorted(n.removesuffix(".npy") for n in z.namelist())
      if not {"X", "y"} <= set(names):
        raise DataError(f"it holds arrays {names}, not X and y; {SAVE_HINT}")
      arrays = {}
      for key in ("X", "y"):
        with z.open(f"{key}.npy") as m:
          version = np.lib.format.read_magic(m)
          header = {(1, 0): np.lib.format.read_array_header_1_0,
                    (2, 0): np.lib.format.read_array_header_2_0}.get(version)
          if header is not None and header(m)[2].hasobject:
            raise DataError(f"{key} holds Python objects (a pickle), which "
                            "train.py never loads; save numeric arrays")
        with z.open(f"{key}.npy") as m:
          arrays[key] = np.lib.format.read_array(m, allow_pickle=False)
  except DataError:
    raise
  except Exception as e:  # zip or .npy damage of any kind
    raise DataError(f"not a readable .npz file ({type(e).__name__}: "
                    f"{str(e).strip()[:100]})") from None
  return arrays


def _where(mask: np.ndarray) -> str:
  """'row r' (or 'row r, column c') of mask's first True."""
  index = np.argwhere(mask)[0]
  return ", ".join(f"{axis} {i}" for axis, i in zip(("row", "column"),
                                                    index, strict=False))


def check_labels(y: np.ndarray) -> np.ndarray:
  """y as int32 class indices; raises DataError unless y holds integers
  (integral floats such as 1.0 too) in [0, MAX_LABEL]."""
  if not (np.issubdtype(y.dtype, np.integer) or y.dtype == bool
          or np.issubdtype(y.dtype, np.floating)):
    raise DataError(f"y must hold integer class labels, got dtype {y.dtype}")
  if np.issubdtype(y.dtype, np.floating):
    if (bad := ~np.isfinite(y)).any():
      raise DataError(f"y holds a non-finite label {y[bad][0].item()} "
                      f"({_where(bad)})")
    if (bad := y != np.round(y)).any():
      raise DataError(f"y holds a non-integer label {y[bad][0].item()} "
                      f"({_where(bad)}); labels are class indices")
  if (bad := y < 0).any():
    raise DataError(f"y holds a negative label {int(y[bad][0])} "
                    f"({_where(bad)}); "
                    "labels are class indices 0, 1, ...")
  if (bad := y > MAX_LABEL).any():
    raise DataError(f"label {int(y[bad][0])} ({_where(bad)}) is out of "
                    f"range: labels are class indices 0 ... {MAX_LABEL}")
  return y.astype(np.int32)


def load_data(path: Path | None, hidden: int | None = None) -> Data:
  """Reads, validates, splits and standardizes ``--data`` (or digits).

  hidden: the mlp's hidden width (None: linear), which sizes the output
  layer checked against MAX_WEIGHT_BYTES. Raises DataError (or OSError)
  naming the first problem: other keys, a file that is not an .npz,
  shapes, non-numeric or non-finite features, labels that are not integer
  class indices or would make the output layer too large.
  """
  if path is None:
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
  else:
    arrays = read_npz(path)
    X, y = arrays["X"], arrays["y"]
  if X.ndim != 2 or y.shape != X.shape[:1] or len(y) < 2 or not X.size:
    raise DataError(f"need X (n, d) and y (n,) with n >= 2, d >= 1, got X "
                    f"{X.shape} and y {y.shape}")
  if not (np.issubdtype(X.dtype, np.integer) or X.dtype == bool
          or np.issubdtype(X.dtype, np.floating)):
    raise DataError(f"X must hold real numbers, got dtype {X.dtype}")
  if (bad := ~np.isfinite(X)).any():
    count = int(bad.sum())
    raise DataError(f"X holds {count} non-finite value{'s' * (count > 1)}, "
                    f"the first {X[bad][0].item()} at {_where(bad)}")
  digest = fingerprint({"X": X, "y": y})
  labels = check_labels(y)
  classes = int(labels.max()) + 1
  width = X.shape[1] if hidden is None else hidden
  if (size := 4 * width * classes) > MAX_WEIGHT_BYTES:
    raise DataError(
        f"label {classes - 1} ({_where(labels == classes - 1)}) makes "
        f"{classes} classes, a ({width}, {classes}) float32 weight matrix "
        f"of {size / 2**30:.3g} GiB (at most {MAX_WEIGHT_BYTES / 2**30:g} "
        "GiB); labels are class indices 0 ... classes - 1")
  present = len(np.unique(labels))
  warning = None if present == classes else (
      f"y takes {present} distinct values in 0 ... {classes - 1}, so "
      f"{classes} classes are trained, {classes - present} of them without "
      "a row; relabel with np.unique(y, return_inverse=True) if that is "
      "not meant")
  order = np.random.default_rng(SPLIT_SEED).permutation(len(y))
  n_test = max(1, round(TEST_FRACTION * len(y)))
  test, train = order[:n_test], order[n_test:]
  with np.errstate(all="ignore"):  # overflow: caught just below
    X = X.astype(np.float32)
    mean, std = X[train].mean(0), X[train].std(0)
    X = (X - mean) / np.where(std > 0, std, 1)
  if (bad := ~np.isfinite(X)).any():
    raise DataError(f"X overflows float32 ({_where(bad)}); rescale it")
  return Data(X[train], labels[train], X[test], labels[test], classes,
              digest, warning)


def round_up(n, multiple):
  return -(-n // multiple) * multiple


def put_rows(X, y, size, sharding):
  """Pads (X, y) to `size` rows, masks the padding, shards rows.

  Each process hands over only the rows its own devices hold
  (``jax.make_array_from_process_local_data``).
  """
  pad = size - len(y)
  rows = (np.pad(X, ((0, pad), (0, 0))), np.pad(y, (0, pad)),
          np.arange(size) < len(y))
  mine = local_rows(sharding, (size,))
  return tuple(jax.make_array_from_process_local_data(
      sharding, a[mine], a.shape) for a in rows)


def replicate(tree, sharding):
  """The same host values on every device of every process."""
  return jax.tree_util.tree_map(
      lambda a: jax.make_array_from_process_local_data(
          sharding, np.asarray(a)), tree)


# ----------------------------------------------------------------- model
def init_params(model, seed, d, classes, hidden):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape, np.float32)  # noqa: E731
  if model == "linear":
    return {"W": 0.01 * normal(d, classes)}
  return {"W1": normal(d, hidden) * np.float32(np.sqrt(2 / d)),
          "b1": np.zeros(hidden, np.float32),
          "W2": normal(hidden, classes) * np.float32(np.sqrt(1 / hidden)),
          "b2": np.zeros(classes, np.float32)}


def logits_fn(params, X):
  if "W" in params:
    return X @ params["W"]
  h = jax.nn.relu(X @ params["W1"] + params["b1"][None])
  return h @ params["W2"] + params["b2"][None]


def make_loss(reg):
  """Training objective: masked mean NLL plus the L2 penalty."""
  def loss(params, X, y, mask):
    if "W" in params:
      return linear_softmax_loss(params["W"], X, y, reg, where=mask)
    l2 = sum(jnp.sum(params[k] ** 2) for k in ("W1", "W2"))
    return cross_entropy(logits_fn(params, X), y, where=mask) + reg * l2
  return loss


def make_optimizer(name, lr, steps):
  """adam and sgd decay lr to 0 over `steps` on a cosine schedule."""
  if name == "lbfgs":
    return optax.lbfgs(lr)
  schedule = optax.cosine_decay_schedule(lr, steps)
  if name == "adam":
    return optax.adam(schedule)
  return optax.sgd(schedule, momentum=0.9)


def make_step(loss, optimizer, lbfgs):
  def step(params, state, X, y, mask):
    value_fn = lambda p: loss(p, X, y, mask)  # noqa: E731
    if lbfgs:
      value, grad = optax.value_and_grad_from_state(value_fn)(
          params, state=state)
      updates, state = optimizer.update(
          grad, state, params, value=value, grad=grad, value_fn=value_fn)
    else:
      value, grad = jax.value_and_grad(value_fn)(params)
      updates, state = optimizer.update(grad, state, params)
    return strong((optax.apply_updates(params, updates), state)), value
  return jax.jit(step)


@jax.jit
def evaluate(params, X, y, mask):
  """Mean loss, accuracy and softmax entropy over the unmasked rows, all
  from one ``cross_entropy`` call (``return_aux``: no second pass)."""
  loss, aux = cross_entropy(logits_fn(params, X), y, where=mask,
                            return_aux=True)
  count = jnp.sum(mask)
  return (loss, jnp.sum(aux.correct) / count,
          jnp.sum(jnp.where(mask, aux.entropy, 0.0)) / count)


# ----------------------------------------------------------- checkpoints
def save_checkpoint(run, epoch, params, state, history):
  """Checkpoint ``epoch``: parameter and optimizer-state leaves, history."""
  run.save(epoch, {"params": [to_host(a) for a in jax.tree.leaves(params)],
                   "opt_state": [to_host(a) for a in jax.tree.leaves(state)]},
           {"history": history})


def restore_checkpoint(run, params, state):
  """(epoch, params, state, history) of the newest verified checkpoint,
  trees shaped as the templates params and state; None for a new run.
  Raises RunDirError (ConfigMismatch: a run with other settings)."""
  trees = {"params": params, "opt_state": state}
  ckpt = run.restore({k: jax.tree.leaves(t) for k, t in trees.items()})
  if ckpt is None:
    return None
  params, state = (jax.tree.unflatten(jax.tree.structure(trees[k]),
                                      [jnp.asarray(a) for a in ckpt.trees[k]])
                   for k in ("params", "opt_state"))
  return ckpt.step, params, state, ckpt.meta["history"]


def metrics_json(history, config, backend) -> bytes:
  last = {k: v[-1] for k, v in history.items()}
  return json.dumps({**last, "epochs_completed": len(history["train_loss"]),
                     "backend": backend, "config": config,
                     "history": history}, indent=2).encode()


def write_outputs(run, history, config, backend, curves=True):
  """curves.png (if curves), then metrics.json, so that an up-to-date
  metrics.json of a finished run means a final plot too."""
  if curves:
    title = "{model} model, {optimizer}, {data}".format(**config)
    run.write("curves.png", lambda f: plot(history, title, f))
  run.write("metrics.json", metrics_json(history, config, backend))


def plot(history, title, f):
  from matplotlib.figure import Figure  # Agg canvas, no pyplot state

  fig = Figure(figsize=(9, 3.5), layout="constrained")
  fig.suptitle(title)
  epochs = range(1, len(history["train_loss"]) + 1)
  for ax, metric in zip(fig.subplots(1, 2), ("loss", "accuracy"),
                        strict=True):
    for split in ("train", "test"):
      ax.plot(epochs, history[f"{split}_{metric}"], label=split)
    ax.set(xlabel="epoch", ylabel=metric)
    ax.legend()
  fig.savefig(f, format="png", dpi=100)


# ------------------------------------------------------------------ main
def fail(message: str, code: int = 2) -> NoReturn:
  """Exits with one line on stderr: code 2 refuses before training (flags,
  data, run directory), code 1 is a failure during training."""
  print(f"train.py: error: {message}", file=sys.stderr, flush=True)
  raise SystemExit(code)


def refusal(e: ConfigMismatch, optimizer: str) -> str:
  """The message for a run directory holding other settings."""
  message = f"{e}; pass another --out, or the settings of the run there"
  if "epochs" in e.changed:  # only adam and sgd: "epochs" is free for lbfgs
    there, here = e.changed["epochs"]
    message += (
        f". {optimizer}'s learning rate follows a cosine schedule that "
        f"decays to 0 over the run's --epochs {there}, so the run cannot "
        f"become a {here}-epoch run: rerun with --epochs {there} to resume "
        f"or complete it, or train {here} epochs under another --out "
        "(lbfgs runs, which have no schedule, can be extended)")
  return message


def main(argv: list[str] | None = None) -> int:
  started = time.monotonic()
  parser = build_parser()
  args = parser.parse_args(argv)
  init_distributed(args, parser)
  devices = jax.devices()  # every process's, when multi-process
  lead = jax.process_index() == 0  # the one process that writes files
  n_dev = len(devices) if args.mesh is None else args.mesh
  if n_dev > len(devices):
    parser.error(f"--mesh data={n_dev}: only {len(devices)} "
                 f"device{'s' * (len(devices) != 1)}")
  if jax.process_count() > 1 and (args.out is None or n_dev < len(devices)):
    parser.error("a multi-process run needs --out (the same on every "
                 "process) and all devices in its mesh")
  try:
    data = load_data(args.data, args.hidden if args.model == "mlp" else None)
  except DataError as e:
    fail(f"--data {args.data}: {e}")
  except OSError as e:
    fail(f"--data {args.data}: {e.strerror or e}")
  if data.warning and lead:
    print(f"train.py: warning: --data {args.data}: {data.warning}",
          file=sys.stderr, flush=True)
  lbfgs = args.optimizer == "lbfgs"
  size = round_up(min(args.batch_size, len(data.y_train)), n_dev)
  config = {
      "model": args.model, "optimizer": args.optimizer,
      "lr": args.lr or DEFAULT_LR[args.optimizer], "epochs": args.epochs,
      "batch_size": None if lbfgs else size, "seed": args.seed,
      "reg": args.reg, "hidden": args.hidden if args.model == "mlp" else None,
      "data": str(args.data or "sklearn digits"),
      "data_sha256": data.fingerprint, "devices": n_dev}
  # The data are known by their fingerprint, not their path; lbfgs has no
  # schedule over the epochs, so its runs can be extended.
  free = ("data", "epochs") if lbfgs else ("data",)
  out = args.out or Path("runs", time.strftime("%Y%m%d-%H%M%S"))
  try:
    with RunDir(out, config, prefix="epoch", width=4, free=free,
                keep=args.keep_checkpoints or None, writer=lead) as run:
      return train(args, run, data, config, started)
  except ConfigMismatch as e:
    fail(f"--out {out}: {refusal(e, args.optimizer)}")
  except RunDirError as e:
    fail(f"--out {out}: {e}")


def train(args, run, data, config, started) -> int:
  """Resumes (or reports complete) and trains the run in ``run``."""
  devices, n_dev, lead = jax.devices(), config["devices"], run.writer
  size = config["batch_size"]  # None: lbfgs, the full training split
  lbfgs = size is None
  n, d = data.X_train.shape
  steps = 1 if lbfgs else -(-n // size)  # per epoch
  backend = jax.default_backend()
  mesh = Mesh(np.array(devices[:n_dev]), ("data",))
  rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  print(f"JAX backend: {backend}; devices: {devices}")
  print(f"mesh data={n_dev}, batch {'full' if lbfgs else size}; {n} train / "
        f"{len(data.y_test)} test rows, {d} features, {data.classes} "
        f"classes; out: {run.path}", flush=True)

  optimizer = make_optimizer(args.optimizer, config["lr"], args.epochs * steps)
  params = init_params(args.model, args.seed, d, data.classes, args.hidden)
  state = strong(optimizer.init(params))
  history = {k: [] for k in HISTORY_KEYS}
  start = 0
  restored = restore_checkpoint(run, params, state)
  for path, why in run.skipped if lead else ():
    print(f"skipped damaged checkpoint {path.name} ({why})"
          + (f", renamed {path.name}.corrupt" if run.writable else ""),
          file=sys.stderr, flush=True)
  if restored is not None:
    start, params, state, history = restored
    if start > args.epochs:
      fail(f"--out {run.path}: it holds {start} epochs, more than --epochs "
           f"{args.epochs}; pass --epochs {start} or more, or another --out")
    if start == args.epochs:
      if lead and not run.holds("metrics.json",
                                metrics_json(history, config, backend)):
        if run.writable:
          write_outputs(run, history, config, backend)
        else:
          print(f"train.py: warning: {run.unwritable}: metrics.json and "
                "curves.png are not updated", file=sys.stderr)
      print(f"run in {run.path} is complete ({start} epochs); nothing to do")
      return 0
  if lead:
    run.require_writable()  # before any work
  if restored is not None:
    print(f"resuming from epoch {start} "
          f"({run.checkpoint_path(start)})", flush=True)
  params, state = replicate((params, state), replicated)

  step = make_step(make_loss(args.reg), optimizer, lbfgs)
  # Both splits padded to one size: evaluate compiles once.
  eval_size = round_up(max(n, len(data.y_test)), n_dev)
  train_rows = put_rows(data.X_train, data.y_train, eval_size, rows)
  test_rows = put_rows(data.X_test, data.y_test, eval_size, rows)
  plotted, plot_s = 0.0, 0.0  # when curves.png was drawn, and in how long
  for epoch in range(start + 1, args.epochs + 1):
    if lbfgs:
      batches = [train_rows]
    else:
      order = np.random.default_rng((args.seed, epoch)).permutation(n)
      batches = (put_rows(data.X_train[i], data.y_train[i], size, rows)
                 for i in np.split(order, range(size, n, size)))
    with tqdm(total=steps, unit="step", disable=not lead,
              desc=f"epoch {epoch}/{args.epochs}") as bar:
      for batch in batches:
        (params, state), loss = step(params, state, *batch)
        bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
        bar.update()
      for split, split_rows in (("train", train_rows), ("test", test_rows)):
        loss, acc, entropy = evaluate(params, *split_rows)
        history[f"{split}_loss"].append(float(loss))
        history[f"{split}_accuracy"].append(float(acc))
        history[f"{split}_entropy"].append(float(entropy))
      bar.set_postfix({"train_loss": f"{history['train_loss'][-1]:.4f}",
                       "test_acc": f"{history['test_accuracy'][-1]:.4f}",
                       "entropy": f"{history['test_entropy'][-1]:.3f}"})
    # Redraw after the first and last epochs and whenever 10x the time the
    # last drawing took has passed: fast epochs spend <= ~10% on plots.
    redraw = (epoch in (start + 1, args.epochs)
              or time.monotonic() - plotted >= 10 * plot_s)
    if lead:
      try:
        save_checkpoint(run, epoch, params, state, history)
        t = time.monotonic()
        write_outputs(run, history, config, backend, curves=redraw)
        if redraw:
          plotted = time.monotonic()
          plot_s = plotted - t
      except RunDirError as e:
        kept = run.checkpoints()
        fail(f"{e}; " + (f"the checkpoints up to epoch {kept[-1][0]} are "
                         "intact, rerun the same command to resume once "
                         "there is room" if kept else "no checkpoint yet"),
             code=1)
  print(f"test accuracy {history['test_accuracy'][-1]:.4f}, test loss "
        f"{history['test_loss'][-1]:.4f} after {args.epochs} epochs "
        f"({time.monotonic() - started:.1f} s); wrote {run.path}/"
        "metrics.json, curves.png, checkpoints/")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
