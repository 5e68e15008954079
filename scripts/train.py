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

``--out`` receives ``metrics.json`` (rewritten after every epoch),
``curves.png`` and ``checkpoints/epoch_NNNN.npz``. ``train_loss`` and
``test_loss`` are the mean cross-entropy over the whole split after each
epoch, without the ``--reg`` term.

Checkpoint format: one ``.npz`` per epoch holding the parameter and
optimizer-state leaves (flattened with ``jax.tree_util``, in tree order;
the tree structure is rebuilt from a fresh ``init`` of the same model and
optimizer), the epoch, the seed and settings, and the metric history. Why
not orbax-checkpoint: the state is a few small arrays on one host, and npz
needs no dependency beyond NumPy, stores each array's raw bytes (float32
parameters and optimizer moments come back bit for bit, so a resumed run
ends with exactly the metrics of an uninterrupted one), and fits in a single
file, which makes it atomic: it is written to a temporary file in the same
directory, fsynced, then ``os.replace``d onto its final name, so a kill at
any moment, even mid-write, leaves either the previous checkpoints or the
complete new one. Data order is a pure function of ``(seed, epoch)``, so no
RNG state needs saving.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from jax_softmax import cross_entropy, linear_softmax_loss

DEFAULT_LR = {"adam": 0.03, "sgd": 0.1, "lbfgs": 1.0}
SPLIT_SEED = 0
TEST_FRACTION = 0.25
HISTORY_KEYS = ("train_loss", "train_accuracy", "train_entropy", "test_loss",
                "test_accuracy", "test_entropy")


# ----------------------------------------------------------------- flags
def _checked(kind, ok, what):
  """An argparse type: kind(text), rejected unless ok(value)."""
  def parse(text):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(
          f"expected {kind.__name__}, got {text!r}") from None
    if not ok(value):
      raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return value
  return parse


POSITIVE_INT = _checked(int, lambda v: v > 0, "> 0")
NON_NEGATIVE_INT = _checked(int, lambda v: v >= 0, ">= 0")
POSITIVE_FLOAT = _checked(float, lambda v: 0 < v < math.inf, "> 0, finite")
NON_NEGATIVE_FLOAT = _checked(float, lambda v: 0 <= v < math.inf,
                              ">= 0, finite")


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
one checkpoint per epoch to --out. Rerunning the same command with the same
--out resumes a killed run, or reports a finished one as complete.""",
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
      help="train on FILE.npz, arrays X (n, d) and integer labels y (n,) "
      "in [0, classes), split 75/25 like the default, scikit-learn's "
      "digits (1797 8x8 images, 10 classes)")
  parser.add_argument(
      "--out", type=Path, default=None, metavar="DIR",
      help="output directory; a run already there with the same settings "
      "is resumed from its last checkpoint (default: runs/<timestamp>)")
  parser.add_argument(
      "--mesh", type=_mesh, default=None, metavar="data=N",
      help="shard each batch over the first N devices, a 1-D mesh with "
      "axis 'data' (default: all devices, of every process when launched "
      "multi-process)")
  multi = parser.add_argument_group(
      "multi-process (one process per host, jax.distributed)")
  multi.add_argument(
      "--coordinator-address", default=None, metavar="HOST:PORT",
      help="process 0's address; with --num-processes and --process-id "
      "this process joins a multi-process run (jax.distributed.initialize)")
  multi.add_argument(
      "--num-processes", type=POSITIVE_INT, default=None,
      help="number of processes in the run")
  multi.add_argument(
      "--process-id", type=NON_NEGATIVE_INT, default=None,
      help="this process's index in [0, --num-processes)")
  multi.add_argument(
      "--distributed", action="store_true",
      help="call jax.distributed.initialize() with the cluster settings "
      "JAX detects itself (SLURM, TPU pods, Open MPI, ...)")
  return parser


def init_distributed(args, parser) -> None:
  """Joins a multi-process run when asked to (before any device is used).

  On CPU the processes' collectives go through gloo.
  """
  manual = (args.coordinator_address, args.num_processes, args.process_id)
  if all(v is None for v in manual) and not args.distributed:
    return
  if not args.distributed and any(v is None for v in manual):
    parser.error("--coordinator-address, --num-processes and --process-id "
                 "go together")
  if args.process_id is not None and args.process_id >= args.num_processes:
    parser.error(f"--process-id {args.process_id} is not below "
                 f"--num-processes {args.num_processes}")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(*manual)


# ------------------------------------------------------------------ data
def load_data(path: Path | None):
  """Returns standardized (X_train, y_train, X_test, y_test, classes)."""
  if path is None:
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
  else:
    with np.load(path, allow_pickle=False) as f:
      X, y = f["X"], f["y"]
  if X.ndim != 2 or y.shape != X.shape[:1] or len(y) < 2:
    raise ValueError(f"need X (n, d) and y (n,) with n >= 2, got X "
                     f"{X.shape} and y {y.shape}")
  if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
    raise ValueError(f"y must hold integer labels >= 0, got {y.dtype} "
                     f"with minimum {y.min()}")
  order = np.random.default_rng(SPLIT_SEED).permutation(len(y))
  n_test = max(1, round(TEST_FRACTION * len(y)))
  test, train = order[:n_test], order[n_test:]
  X = X.astype(np.float32)
  mean, std = X[train].mean(0), X[train].std(0)
  X = (X - mean) / np.where(std > 0, std, 1)
  y = y.astype(np.int32)
  return X[train], y[train], X[test], y[test], int(y.max()) + 1


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
  spans = [idx[0] for idx in sharding.addressable_devices_indices_map(
      (size,)).values()]
  lo = min(sl.start or 0 for sl in spans)
  hi = max(size if sl.stop is None else sl.stop for sl in spans)
  return tuple(jax.make_array_from_process_local_data(
      sharding, a[lo:hi], a.shape) for a in rows)


def replicate(tree, sharding):
  """The same host values on every device of every process."""
  return jax.tree_util.tree_map(
      lambda a: jax.make_array_from_process_local_data(
          sharding, np.asarray(a)), tree)


def to_host(a):
  """A NumPy copy of a (replicated) array, also across processes."""
  return np.asarray(a.addressable_data(0) if isinstance(a, jax.Array)
                    else a)


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


def strong(tree):
  """Drops weak types, so fresh, stepped and restored states share one
  compiled step (optax inits some scalars weakly typed)."""
  return jax.tree.map(lambda x: jnp.asarray(x, x.dtype), tree)


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
def atomic_write(path: Path, write) -> None:
  """Calls write(file) on a temp file, fsyncs it, renames it onto path."""
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".",
                             suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise
  dir_fd = os.open(path.parent, os.O_RDONLY)
  try:
    os.fsync(dir_fd)  # make the rename itself durable
  finally:
    os.close(dir_fd)


def save_checkpoint(ckpt_dir, epoch, params, state, config, history):
  arrays = {"epoch": np.int64(epoch), "seed": np.int64(config["seed"]),
            "config": np.str_(json.dumps(config, sort_keys=True))}
  for prefix, tree in (("params", params), ("opt_state", state)):
    for i, leaf in enumerate(jax.tree_util.tree_leaves(tree)):
      arrays[f"{prefix}/{i}"] = to_host(leaf)
  for key in HISTORY_KEYS:
    arrays[f"history/{key}"] = np.asarray(history[key], np.float64)
  atomic_write(ckpt_dir / f"epoch_{epoch:04d}.npz",
               lambda f: np.savez(f, **arrays))


def load_checkpoint(path, config, params, state):
  """Returns (epoch, params, state, history), trees shaped as the templates.

  Raises ValueError if the run was made with settings other than config.
  """
  with np.load(path, allow_pickle=False) as f:
    saved = json.loads(str(f["config"]))
    if changed := sorted(k for k in config if config[k] != saved.get(k)):
      raise ValueError("it holds a run with other settings (" + ", ".join(
          f"{k}: {saved.get(k)} there, {config[k]} here" for k in changed)
          + "); pass another --out")

    def restore(prefix, template):
      leaves, treedef = jax.tree_util.tree_flatten(template)
      return treedef.unflatten(
          [jnp.asarray(f[f"{prefix}/{i}"], leaf.dtype)
           for i, leaf in enumerate(leaves)])
    history = {k: [float(v) for v in f[f"history/{k}"]]
               for k in HISTORY_KEYS}
    return (int(f["epoch"]), restore("params", params),
            restore("opt_state", state), history)


def latest_checkpoint(out: Path, clean: bool = True) -> Path | None:
  """The newest checkpoint in out/checkpoints; deletes partial writes
  (``clean``: the writing process only)."""
  partials = ("checkpoints/epoch_*.tmp", "metrics.json.*.tmp",
              "curves.png.*.tmp")
  for pattern in partials if clean else ():
    for partial in out.glob(pattern):  # left by a kill mid-write
      partial.unlink()
  paths = out.glob("checkpoints/epoch_*.npz")
  return max(paths, key=lambda p: int(p.stem[6:]), default=None)


def write_outputs(out, history, config, backend, final=True):
  last = {k: v[-1] for k, v in history.items()}
  metrics = {**last, "epochs_completed": len(history["train_loss"]),
             "backend": backend, "config": config, "history": history}
  atomic_write(out / "metrics.json",
               lambda f: f.write(json.dumps(metrics, indent=2).encode()))
  if final:
    title = "{model} model, {optimizer}, {data}".format(**config)
    atomic_write(out / "curves.png", lambda f: plot(history, title, f))


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
def main(argv: list[str] | None = None) -> int:
  started = time.monotonic()
  parser = build_parser()
  args = parser.parse_args(argv)
  init_distributed(args, parser)
  devices = jax.devices()  # every process's, when multi-process
  lead = jax.process_index() == 0  # the one process that writes files
  n_dev = len(devices) if args.mesh is None else args.mesh
  if n_dev > len(devices):
    parser.error(f"--mesh data={n_dev}: only {len(devices)} devices")
  if jax.process_count() > 1 and (args.out is None or n_dev < len(devices)):
    parser.error("a multi-process run needs --out (the same on every "
                 "process) and all devices in its mesh")
  try:
    X_train, y_train, X_test, y_test, classes = load_data(args.data)
  except (OSError, KeyError, ValueError) as e:
    parser.error(f"--data {args.data}: {e}")
  lbfgs = args.optimizer == "lbfgs"
  n, d = X_train.shape
  size = round_up(min(args.batch_size, n), n_dev)
  steps = 1 if lbfgs else -(-n // size)  # per epoch
  config = {
      "model": args.model, "optimizer": args.optimizer,
      "lr": args.lr or DEFAULT_LR[args.optimizer], "epochs": args.epochs,
      "batch_size": None if lbfgs else size, "seed": args.seed,
      "reg": args.reg, "hidden": args.hidden if args.model == "mlp" else None,
      "data": str(args.data or "sklearn digits"), "devices": n_dev}
  out = args.out or Path("runs", time.strftime("%Y%m%d-%H%M%S"))
  ckpt_dir = out / "checkpoints"
  ckpt_dir.mkdir(parents=True, exist_ok=True)

  backend = jax.default_backend()
  mesh = Mesh(np.array(devices[:n_dev]), ("data",))
  rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  print(f"JAX backend: {backend}; devices: {devices}")
  print(f"mesh data={n_dev}, batch {'full' if lbfgs else size}; {n} train / "
        f"{len(y_test)} test rows, {d} features, {classes} classes; "
        f"out: {out}", flush=True)

  optimizer = make_optimizer(args.optimizer, config["lr"], args.epochs * steps)
  params = init_params(args.model, args.seed, d, classes, args.hidden)
  state = strong(optimizer.init(params))
  history = {k: [] for k in HISTORY_KEYS}
  start = 0
  if (path := latest_checkpoint(out, clean=lead)) is not None:
    try:
      start, params, state, history = load_checkpoint(path, config, params,
                                                      state)
    except ValueError as e:
      parser.error(f"--out {out}: {e}")
    if start >= args.epochs:
      if lead:
        write_outputs(out, history, config, backend)
      print(f"run in {out} is complete ({start} epochs); nothing to do")
      return 0
    print(f"resuming from epoch {start} ({path})", flush=True)
  params, state = replicate((params, state), replicated)

  step = make_step(make_loss(args.reg), optimizer, lbfgs)
  # Both splits padded to one size: evaluate compiles once.
  eval_size = round_up(max(n, len(y_test)), n_dev)
  train_rows = put_rows(X_train, y_train, eval_size, rows)
  test_rows = put_rows(X_test, y_test, eval_size, rows)
  for epoch in range(start + 1, args.epochs + 1):
    if lbfgs:
      batches = [train_rows]
    else:
      order = np.random.default_rng((args.seed, epoch)).permutation(n)
      batches = (put_rows(X_train[i], y_train[i], size, rows)
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
    if lead:
      save_checkpoint(ckpt_dir, epoch, params, state, config, history)
      write_outputs(out, history, config, backend,
                    final=epoch == args.epochs)
  print(f"test accuracy {history['test_accuracy'][-1]:.4f}, test loss "
        f"{history['test_loss'][-1]:.4f} after {args.epochs} epochs "
        f"({time.monotonic() - started:.1f} s); wrote {out}/metrics.json, "
        "curves.png, checkpoints/")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
