"""Train a small transformer language model whose head is the fused loss.

    python scripts/train_lm.py                      # stdlib source, ~2 min
    python scripts/train_lm.py --text my_corpus/ --out runs/mine
    python scripts/train_lm.py --head optax         # materialized logits
    python scripts/train_lm.py --memory-only --d-model 1024 --seq-len 2048 \\
        --vocab-size 32000                          # head memory, no run

Data, with no download: by default the Python files of ``DEFAULT_MODULES``
(52 modules of the running interpreter's standard library, found through
``sysconfig``; about 2.8 MB of source on CPython 3.11, so the corpus
follows the Python version), or ``--text PATH``: a UTF-8 file or a
directory of them (every non-hidden file below it, in path order; files
that are not UTF-8 are skipped). Files are the unit of the held-out split:
``EVAL_FRACTION`` of them (at least one) chosen with the fixed seed
``SPLIT_SEED``; a single file is first cut at line boundaries into
``SINGLE_FILE_PIECES`` consecutive pieces that stand for files.

Tokenizer: a byte-level BPE trained on the training files with Hugging
Face ``tokenizers`` (locally, in a second or so), with one special token
``<|endoftext|>`` that opens and closes every file; it is saved as
``tokenizer.json`` in the run directory and reused on resume. Each file's
token ids are cut into rows of ``--seq-len`` inputs and next-token targets;
the tail of a file's last row is padded, its targets ``-100``
(``ignore_index``), so no row spans two files and every loss is the exact
mean over real tokens. Step ``s`` trains on rows ``(s-1)*B .. s*B-1`` of
an endless stream of permutations of the training rows, permutation ``e``
drawn from ``(seed, e)``: data order is a pure function of the seed, so no
RNG state is checkpointed.

Model: plain JAX, a dict of arrays and three functions. Why not flax: the
model is forty lines a reader can follow to the math without a framework's
conventions, the parameters are an ordinary pytree that optax updates and
the checkpoint stores leaf by leaf, and the project gains no dependency.
Token and learned position embeddings, ``--layers`` pre-norm blocks
(RMSNorm, causal multi-head attention through
``jax.nn.dot_product_attention``, RMSNorm, a 4x GELU MLP) run by
``lax.scan`` over stacked weights, a final RMSNorm, and the output head
tied to the input embedding ``E`` of shape ``(V, d)``:

* ``--head fused`` (default): ``jax_softmax.linear_cross_entropy(h, E,
  targets, w_layout="vd", ignore_index=-100, z_loss=...)``: the ``(B, T,
  V)`` logits are never held;
* ``--head optax``: the logits ``h @ E.T``, then
  ``optax.softmax_cross_entropy_with_integer_labels`` plus
  ``z_loss * logsumexp**2``, masked to the real tokens.

Both are the same loss (a test checks step 1 agrees to float32 noise).
Before training the script compiles one ``value_and_grad`` of each head at
the run's shapes and prints its temporaries
(``compiled.memory_analysis().temp_size_in_bytes``, per device);
``--memory-only`` prints just that table for any shapes. Optimizer: optax
AdamW (b2 0.95, weight decay on the matrices), gradients clipped to global
norm 1, linear warm-up then cosine decay to a tenth of ``--lr``.

Devices: a mesh ``("data", "model")`` of ``AxisType.Explicit`` axes, by
default all devices (of all processes when launched multi-process with the
flags of ``scripts/train.py``; each process hands over only its own rows,
``jax.make_array_from_process_local_data``) on ``"data"`` and ``model=1``.
Batches are split over ``"data"``; under it ``linear_cross_entropy`` runs
its chunk loop on each device's own rows and sums the gradients of ``E``.
``--vocab-parallel`` splits the head's ``E`` on ``V`` over ``"model"``:
``linear_cross_entropy(..., axis_name="model", batch_axis_name="data")``
inside ``jax.shard_map``, a few per-row collectives and no all-gather.

Run directory (``--out``, ``scripts/rundir.py``): a lock (one run at a
time), ``tokenizer.json``, ``metrics.json`` and ``curves.png`` written
atomically after every checkpoint, and ``checkpoints/step_NNNNNNNN.npz``
every ``--checkpoint-every`` steps (the newest ``--keep-checkpoints``
kept): parameter and optimizer-state leaves with a checksum, the config
(including the corpus's sha256, so a moved corpus resumes and an edited
one is refused) and, as meta, the metrics so far and the tokenizer's
sha256. Rerunning the same command resumes from the newest verified
checkpoint and, since data order is a pure function of the seed and the
compiled step is the same program, ends with exactly the metrics and
parameters of an uninterrupted run (``tokens_per_second`` aside).

``metrics.json``: ``history`` (one entry per step, ``{"step",
"train_loss", "lr", "grad_norm"}`` plus ``"eval_loss"`` on evaluation
steps), ``eval_loss`` (the last), ``train_loss``, ``vocab_size``,
``log_vocab``, ``tokens_per_second``, ``head_temp_bytes`` (``{"fused",
"optax"}``), ``backend``, ``devices``, ``config``, ``sample`` and corpus
sizes. ``train_loss`` is the training objective on that step's batch
(cross-entropy plus z-loss); ``eval_loss`` is the plain cross-entropy in
nats per token over the held-out rows (all of them, or ``--eval-batches``
batches spread evenly over them), to compare with ``log V``, the loss of
a uniform guess. ``tokens_per_second`` counts the batch's token positions
(padding included) over this session's training steps but its first
(which compiles), evaluations and checkpoints aside.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import sysconfig
import time
from pathlib import Path
from typing import NamedTuple

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
  checked,
  init_distributed,
  local_rows,
  strong,
  to_host,
)
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from rundir import ConfigMismatch, RunDir, RunDirError, fingerprint_file
from tqdm import tqdm

from jax_softmax import linear_cross_entropy

# The default corpus: these standard-library modules' files (NAME.py, or
# NAME/__init__.py where the module is a package), present in CPython
# 3.10 to 3.13.
DEFAULT_MODULES = (
    "argparse", "ast", "bdb", "calendar", "codecs", "configparser",
    "contextlib", "csv", "dataclasses", "difflib", "dis", "doctest", "enum",
    "fractions", "ftplib", "functools", "gettext", "heapq", "inspect",
    "ipaddress", "locale", "mailbox", "ntpath", "optparse", "os", "pathlib",
    "pdb", "pickle", "pickletools", "platform", "pprint", "pstats", "pydoc",
    "random", "shutil", "smtplib", "socket", "socketserver", "ssl",
    "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "tokenize", "trace", "traceback", "typing", "uuid",
    "zipfile")
SPLIT_SEED = 0
EVAL_FRACTION = 0.1
SINGLE_FILE_PIECES = 10
EOS = "<|endoftext|>"
IGNORE = -100  # target of padding: ignore_index of both heads
DEFAULT_PROMPT = "    def __init__(self"  # of the sample, default corpus


# ----------------------------------------------------------------- flags
VOCAB_SIZE = checked(int, lambda v: v >= 258, ">= 258 (256 bytes, "
                     f"{EOS} and at least one merge)")


def _mesh(text):
  sizes = {}
  for part in text.split(","):
    name, _, size = part.partition("=")
    if name not in ("data", "model") or name in sizes or not size.isdigit() \
        or int(size) < 1:
      raise argparse.ArgumentTypeError(
          f"expected data=N or data=N,model=M (N, M >= 1), got {text!r}")
    sizes[name] = int(size)
  return sizes


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="train_lm.py",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description="""\
Train a small decoder-only transformer language model with optax, its
output head tied to the input embedding and computed by
jax_softmax.linear_cross_entropy (or, with --head optax, by optax on
materialized logits). Data: this Python's own standard-library source (no
download) or --text. Writes tokenizer.json, metrics.json, curves.png and
checkpoints to --out; rerunning the same command with the same --out
resumes a killed run exactly, or reports a finished one as complete.""",
      epilog="""\
examples:
  python scripts/train_lm.py                      # about 2 min on 2 cores
  python scripts/train_lm.py --head optax --out runs/optax
  python scripts/train_lm.py --text notes.txt --vocab-size 2000
  python scripts/train_lm.py --memory-only --d-model 1024 --seq-len 2048 \\
      --vocab-size 32000""")
  data = parser.add_argument_group("data and tokenizer")
  data.add_argument(
      "--text", type=Path, default=None, metavar="PATH",
      help="train on PATH, a UTF-8 text file or a directory of them "
      "(default: the files of 52 modules of this Python's standard "
      "library, see DEFAULT_MODULES); files are split into training and "
      "held-out sets, a single file into 10 pieces first")
  data.add_argument(
      "--vocab-size", type=VOCAB_SIZE, default=8192,
      help="vocabulary of the byte-level BPE trained on the training files "
      "(a small corpus may yield fewer; metrics.json has the real size) "
      "(default: %(default)s)")
  model = parser.add_argument_group("model")
  model.add_argument("--d-model", type=POSITIVE_INT, default=128,
                     help="width of the residual stream and of the tied "
                     "embedding (default: %(default)s)")
  model.add_argument("--layers", type=POSITIVE_INT, default=2,
                     help="transformer blocks (default: %(default)s)")
  model.add_argument("--heads", type=POSITIVE_INT, default=4,
                     help="attention heads; must divide --d-model "
                     "(default: %(default)s)")
  model.add_argument("--seq-len", type=POSITIVE_INT, default=128,
                     help="tokens per row, the context length (default: "
                     "%(default)s)")
  model.add_argument(
      "--head", choices=("fused", "optax"), default="fused",
      help="fused: jax_softmax.linear_cross_entropy on the hidden states, "
      "no logits held; optax: logits h @ E.T, then optax's cross-entropy "
      "(default: %(default)s)")
  model.add_argument(
      "--chunk-size", type=POSITIVE_INT, default=None,
      help="rows per chunk of the fused head (default: chosen by "
      "linear_cross_entropy from its memory budget)")
  model.add_argument(
      "--z-loss", type=NON_NEGATIVE_FLOAT, default=1e-4,
      help="coefficient of the z-loss z * logsumexp(logits)**2 per token, "
      "added to the training objective (default: %(default)s)")
  train = parser.add_argument_group("training")
  train.add_argument("--steps", type=POSITIVE_INT, default=400,
                     help="optimizer steps (default: %(default)s)")
  train.add_argument(
      "--batch-size", type=POSITIVE_INT, default=16,
      help="rows per step, rounded up to a multiple of the data-parallel "
      "device count (default: %(default)s)")
  train.add_argument("--lr", type=POSITIVE_FLOAT, default=3e-3,
                     help="peak learning rate of AdamW (default: "
                     "%(default)s)")
  train.add_argument(
      "--warmup", type=NON_NEGATIVE_INT, default=40,
      help="steps of linear warm-up to --lr (at most a quarter of "
      "--steps; step s of it uses lr * s / warmup), then cosine decay to "
      "lr/10 at the last step (default: %(default)s)")
  train.add_argument(
      "--weight-decay", type=NON_NEGATIVE_FLOAT, default=0.1,
      help="AdamW weight decay of the weight matrices and the embedding "
      "(not of norms and positions) (default: %(default)s)")
  train.add_argument(
      "--seed", type=NON_NEGATIVE_INT, default=0,
      help="seeds the initial parameters, the data order and the sample; "
      "the held-out split is fixed (default: %(default)s)")
  train.add_argument(
      "--eval-every", type=POSITIVE_INT, default=100,
      help="held-out loss every this many steps and after the last "
      "(default: %(default)s)")
  train.add_argument(
      "--eval-batches", type=POSITIVE_INT, default=8,
      help="evaluate on at most this many batches of held-out rows, "
      "spread evenly over them (default: %(default)s)")
  train.add_argument(
      "--checkpoint-every", type=POSITIVE_INT, default=50,
      help="save a checkpoint every this many steps and after the last; "
      "a killed run resumes from the latest (default: %(default)s)")
  out = parser.add_argument_group("output")
  out.add_argument(
      "--out", type=Path, default=None, metavar="DIR",
      help="run directory; a run already there with the same settings is "
      "resumed from its last checkpoint (default: runs/lm-<timestamp>)")
  out.add_argument(
      "--keep-checkpoints", type=NON_NEGATIVE_INT, default=3, metavar="N",
      help="keep the N newest checkpoints, 0 for all (default: %(default)s)")
  out.add_argument(
      "--prompt", default=None,
      help="start of the sample generated at the end (default: four "
      f"spaces and {DEFAULT_PROMPT.strip()!r} for the default corpus, "
      "nothing, i.e. the start of a file, for --text)")
  out.add_argument(
      "--sample-tokens", type=NON_NEGATIVE_INT, default=60,
      help="tokens to generate after training, temperature 0.8 "
      "(default: %(default)s)")
  out.add_argument(
      "--memory-only", action="store_true",
      help="print the head-memory table (temporaries of one "
      "value_and_grad of each head, compiled at these shapes) and exit: "
      "no data, no training, no files")
  scale = parser.add_argument_group("devices")
  scale.add_argument(
      "--mesh", type=_mesh, default=None, metavar="data=N[,model=M]",
      help="use the first N*M devices: batches sharded over N on axis "
      "'data'; with --vocab-parallel, the head's vocabulary split over M "
      "on axis 'model' (defaults: model=1, data = the device count "
      "divided by M)")
  scale.add_argument(
      "--vocab-parallel", action="store_true",
      help="shard the output head's E over the mesh axis 'model' on V, "
      "linear_cross_entropy(..., axis_name='model') inside shard_map "
      "(fused head only)")
  add_multiprocess_args(parser)
  return parser


# ---------------------------------------------------------------- corpus
class Corpus(NamedTuple):
  names: list[str]  # one per document, relative to the corpus root
  texts: list[str]
  source: str  # what config["data"] records
  skipped: int = 0  # files that were not UTF-8

  def fingerprint(self) -> str:
    """sha256 of the documents' names and contents, in order."""
    h = hashlib.sha256()
    for name, text in zip(self.names, self.texts, strict=True):
      for part in (name, text):
        data = part.encode()
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def stdlib_corpus() -> Corpus:
  root = Path(sysconfig.get_paths()["stdlib"])
  names, texts = [], []
  for module in DEFAULT_MODULES:
    for rel in (f"{module}.py", f"{module}/__init__.py"):
      if (root / rel).is_file():
        names.append(rel)
        texts.append((root / rel).read_text(encoding="utf-8"))
        break
  if len(names) < 2:
    raise OSError(f"found {len(names)} of the default modules in {root}")
  return Corpus(names, texts, f"python {sys.version.split()[0]} stdlib")


def text_corpus(path: Path) -> Corpus:
  """The UTF-8 files at path (a file, or every non-hidden file below a
  directory); a single file is cut into line-aligned pieces."""
  if path.is_dir():
    files = sorted(p for p in path.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(path).parts))
  elif path.is_file():
    files = [path]
  else:
    raise OSError(f"no such file or directory: {path}")
  names, texts, skipped = [], [], 0
  for f in files:
    try:
      text = f.read_text(encoding="utf-8")
    except UnicodeDecodeError:
      skipped += 1
      continue
    if text.strip():
      # names relative to the corpus root: a moved corpus is the same one
      names.append(f.relative_to(path).as_posix() if path.is_dir() else "")
      texts.append(text)
  if len(texts) == 1:
    lines = texts[0].splitlines(keepends=True)
    cuts = np.linspace(0, len(lines), SINGLE_FILE_PIECES + 1).round()
    cuts = sorted(set(int(c) for c in cuts))
    texts = ["".join(lines[a:b])
             for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    names = [f"{names[0]}[{i}]" for i in range(len(texts))]
  if len(texts) < 2:
    raise ValueError("need at least two non-empty UTF-8 files (or one of "
                     f"two lines or more) to hold one out, found {len(texts)}")
  return Corpus(names, texts, str(path), skipped)


def split_documents(n: int):
  """(train, held_out) document indices, fixed by SPLIT_SEED."""
  order = np.random.default_rng(SPLIT_SEED).permutation(n)
  n_eval = min(n - 1, max(1, round(EVAL_FRACTION * n)))
  return np.sort(order[n_eval:]), np.sort(order[:n_eval])


# ------------------------------------------------------------- tokenizer
def train_tokenizer(texts, vocab_size):
  """A byte-level BPE (Hugging Face tokenizers), trained here."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(texts, trainer)
  return tokenizer


def load_tokenizer(path: Path):
  from tokenizers import Tokenizer

  return Tokenizer.from_file(str(path))


def to_rows(tokenizer, texts, seq_len):
  """(inputs, targets), int32 (rows, seq_len): each text as
  EOS ids EOS cut into next-token rows; a row's padding has target -100."""
  eos = tokenizer.token_to_id(EOS)
  inputs, targets = [], []
  for enc in tokenizer.encode_batch(texts):
    ids = np.array([eos, *enc.ids, eos], np.int32)
    n_rows = -(-(len(ids) - 1) // seq_len)
    pad = n_rows * seq_len + 1 - len(ids)
    x = np.pad(ids[:-1], (0, pad), constant_values=eos)
    y = np.pad(ids[1:], (0, pad), constant_values=IGNORE)
    inputs.append(x.reshape(n_rows, seq_len))
    targets.append(y.reshape(n_rows, seq_len))
  return np.concatenate(inputs), np.concatenate(targets)


def batch_rows(step, batch, n, seed):
  """Row indices of step (1-based): positions (step-1)*batch ... of the
  stream of permutations of range(n), permutation e drawn from (seed, e)."""
  pos = (step - 1) * batch + np.arange(batch)
  epochs = pos // n
  perms = {e: np.random.default_rng((seed, int(e))).permutation(n)
           for e in np.unique(epochs)}
  return np.array([perms[e][p % n] for e, p in zip(epochs, pos,
                                                     strict=True)])


def eval_rows(inputs, targets, batch, max_batches):
  """The held-out rows (an evenly spread subset of at most max_batches
  batches), padded to whole batches with rows of ignored targets."""
  n = len(inputs)
  if n > batch * max_batches:
    keep = np.linspace(0, n - 1, batch * max_batches).round().astype(int)
    inputs, targets = inputs[keep], targets[keep]
    n = len(keep)
  pad = -n % batch
  inputs = np.pad(inputs, ((0, pad), (0, 0)))
  targets = np.pad(targets, ((0, pad), (0, 0)), constant_values=IGNORE)
  return inputs, targets


# ----------------------------------------------------------------- model
class ModelConfig(NamedTuple):
  vocab: int
  d_model: int
  layers: int
  heads: int
  seq_len: int


def init_params(cfg: ModelConfig, seed: int):
  """GPT-2-style initialization (residual projections scaled by
  1/sqrt(2 layers)), drawn on the host from seed."""
  rng = np.random.default_rng(seed)
  d, L = cfg.d_model, cfg.layers

  def normal(std, *shape):
    return (std * rng.standard_normal(shape)).astype(np.float32)
  res = 0.02 / math.sqrt(2 * L)
  return {
      "embed": normal(0.02, cfg.vocab, d),  # tied: also the output head
      "pos": normal(0.01, cfg.seq_len, d),
      "blocks": {  # stacked over layers, run by lax.scan
          "norm1": np.ones((L, d), np.float32),
          "qkv": normal(0.02, L, d, 3 * d),
          "proj": normal(res, L, d, d),
          "norm2": np.ones((L, d), np.float32),
          "up": normal(0.02, L, d, 4 * d),
          "down": normal(res, L, 4 * d, d)},
      "norm_f": np.ones(d, np.float32)}


def decay_mask(params):
  """Weight decay on the matrices and the embedding only."""
  decayed = ("embed", "qkv", "proj", "up", "down")
  return jax.tree_util.tree_map_with_path(
      lambda path, _: path[-1].key in decayed, params)


def rms_norm(x, scale):
  x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)
  return x * scale


def hidden_states(params, tokens, heads):
  """The final normalized (B, T, d) states of tokens (B, T)."""
  B, T = tokens.shape
  d = params["embed"].shape[1]
  # A gather whose output keeps the tokens' sharding (Explicit axes).
  spec = jax.typeof(tokens).sharding.spec
  x = params["embed"].at[tokens].get(out_sharding=P(*spec, None))
  x = x + params["pos"][None, :T]

  def block(x, p):
    q, k, v = jnp.split(rms_norm(x, p["norm1"]) @ p["qkv"], 3, axis=-1)
    split = lambda a: a.reshape(B, T, heads, d // heads)  # noqa: E731
    att = jax.nn.dot_product_attention(split(q), split(k), split(v),
                                       is_causal=True)
    x = x + att.reshape(B, T, d) @ p["proj"]
    h = jax.nn.gelu(rms_norm(x, p["norm2"]) @ p["up"])
    return x + h @ p["down"], None
  x, _ = jax.lax.scan(block, x, params["blocks"])
  return rms_norm(x, params["norm_f"])


# ----------------------------------------------------------------- heads
def fused_head(h, embed, targets, *, z_loss, reduction="mean",
               chunk_size=None, axis_name=None, batch_axis_name=None):
  return linear_cross_entropy(
      h, embed, targets, w_layout="vd", ignore_index=IGNORE, z_loss=z_loss,
      reduction=reduction, chunk_size=chunk_size, axis_name=axis_name,
      batch_axis_name=batch_axis_name)


def optax_head(h, embed, targets, *, z_loss, reduction="mean"):
  """The same loss from materialized (B, T, V) logits."""
  logits = h @ embed.T
  real = targets != IGNORE
  loss = optax.softmax_cross_entropy_with_integer_labels(
      logits, jnp.where(real, targets, 0))
  loss = loss + z_loss * jax.nn.logsumexp(logits, axis=-1) ** 2
  total = jnp.sum(jnp.where(real, loss, 0.0))
  return total if reduction == "sum" else total / jnp.sum(real)


def make_head(name, chunk_size, mesh, vocab_parallel):
  """head(h, embed, targets, z_loss=, reduction=) of the chosen kind."""
  if name == "optax":
    return optax_head
  if not vocab_parallel:
    return lambda *a, **kw: fused_head(*a, chunk_size=chunk_size, **kw)

  def sharded(h, embed, targets, *, z_loss, reduction="mean"):
    # Inside shard_map each device holds its rows of h and targets and
    # its V / model slice of embed; the loss comes back replicated.
    local = jax.shard_map(
        lambda h, e, t: fused_head(
            h, e, t, z_loss=z_loss, reduction=reduction,
            chunk_size=chunk_size, axis_name="model",
            batch_axis_name="data"),
        mesh=mesh, in_specs=(P("data"), P("model"), P("data")),
        out_specs=P())
    embed = jax.reshard(embed, P("model"))
    return local(h, embed, targets)
  return sharded


def head_temp_bytes(head, mesh, batch, seq_len, d_model, vocab, z_loss):
  """Temporaries (bytes per device) of one compiled value_and_grad of head
  w.r.t. (h, embed) at these shapes, batch sharded over 'data'."""
  def shaped(shape, dtype, *spec):
    return jax.ShapeDtypeStruct(shape, dtype,
                                sharding=NamedSharding(mesh, P(*spec)))
  h = shaped((batch, seq_len, d_model), jnp.float32, "data")
  embed = shaped((vocab, d_model), jnp.float32)
  targets = shaped((batch, seq_len), jnp.int32, "data")
  f = jax.value_and_grad(
      lambda h, e, t: head(h, e, t, z_loss=z_loss), argnums=(0, 1))
  with jax.set_mesh(mesh):
    compiled = jax.jit(f).lower(h, embed, targets).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)


def memory_table(temps, batch, seq_len, d_model, vocab, n_data, n_model=1):
  """The printed table of head_temp_bytes (temps: name -> bytes)."""
  mib = 2.0 ** 20
  logits = batch * seq_len * vocab * 4 / n_data / mib
  where = f"mesh data={n_data}" + (f", model={n_model}" if n_model > 1
                                   else "")
  lines = [f"head memory: temporaries of one value_and_grad at h ({batch}, "
           f"{seq_len}, {d_model}), E ({vocab}, {d_model}), float32, per "
           f"device ({where}); the logits alone: {logits:,.1f} MiB"]
  for name, value in temps.items():
    lines.append(f"  {name:6s} {value / mib:12,.1f} MiB")
  lines.append(f"  optax / fused: {temps['optax'] / temps['fused']:.1f}x")
  return "\n".join(lines)


# -------------------------------------------------------------- training
def make_optimizer(lr, steps, warmup, weight_decay, params):
  """(schedule, optimizer): step s (1-based) updates with lr schedule(s-1),
  rising linearly to lr over the warm-up, then a cosine down to lr/10."""
  warmup = min(warmup, steps // 4)
  base = optax.warmup_cosine_decay_schedule(
      0.0, lr, warmup, max(steps, warmup + 1), end_value=lr / 10)

  def schedule(count):  # optax counts updates from 0; skip the lr = 0 one
    return base(count + 1)
  return schedule, optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=weight_decay,
                  mask=decay_mask(params)))


def make_step(head, heads, z_loss, optimizer):
  def loss_fn(params, tokens, targets):
    h = hidden_states(params, tokens, heads)
    return head(h, params["embed"], targets, z_loss=z_loss)

  def step(params, state, tokens, targets):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens, targets)
    updates, state = optimizer.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    return strong((params, state)), loss, optax.global_norm(grads)
  return jax.jit(step, donate_argnums=(0, 1))


def make_eval(head, heads):
  @jax.jit
  def eval_sum(params, tokens, targets):
    """Summed cross-entropy (no z-loss) and count of real targets."""
    h = hidden_states(params, tokens, heads)
    total = head(h, params["embed"], targets, z_loss=0.0, reduction="sum")
    return total, jnp.sum(targets != IGNORE)
  return eval_sum


def evaluate(eval_sum, params, batches):
  total = count = 0.0
  for tokens, targets in batches:
    t, c = eval_sum(params, tokens, targets)
    total += float(t)
    count += int(c)
  return total / count


def sample(params, tokenizer, prompt, n_tokens, heads, seq_len, seed,
           replicated):
  """prompt plus n_tokens drawn at temperature 0.8 (the last seq_len
  tokens as context); the same on every process."""
  @jax.jit
  def next_logits(params, tokens, last):
    h = hidden_states(params, tokens, heads)[0, last]
    return h @ params["embed"].T

  ids = [tokenizer.token_to_id(EOS), *tokenizer.encode(prompt).ids]
  eos = ids[0]
  for i in range(n_tokens):
    window = ids[-seq_len:]
    tokens = np.full((1, seq_len), eos, np.int32)
    tokens[0, :len(window)] = window
    logits = next_logits(params, put(tokens, replicated), len(window) - 1)
    # Gumbel-max on the host: a draw from softmax(logits / 0.8).
    gumbel = np.random.default_rng((seed, i)).gumbel(size=logits.shape)
    token = int(np.argmax(to_host(logits) / 0.8 + gumbel))
    if token == eos:
      break
    ids.append(token)
  return tokenizer.decode(ids[1:])


# --------------------------------------------------------- host <-> mesh
def put(a, sharding):
  """A global array of host value a (the same on every process); each
  process hands over only its own devices' rows."""
  a = np.asarray(a)
  # Spelled out to a's rank, P(None, None) rather than P(): the spec jit
  # gives its outputs, so that a fresh, a stepped and a restored state
  # share one compiled step (and a resumed run computes bit for bit alike).
  spec = (*sharding.spec, *[None] * (a.ndim - len(sharding.spec)))
  sharding = NamedSharding(sharding.mesh, P(*spec))
  if not a.ndim or spec[0] is None:
    return jax.make_array_from_process_local_data(sharding, a, a.shape)
  return jax.make_array_from_process_local_data(
      sharding, a[local_rows(sharding, a.shape)], a.shape)


# ---------------------------------------------------- run directory
def save_checkpoint(run, step, params, state, meta):
  """Checkpoint ``step``: parameter and optimizer-state leaves, and meta
  (the metrics so far and the tokenizer's sha256)."""
  run.save(step, {"params": [to_host(a) for a in jax.tree.leaves(params)],
                  "opt_state": [to_host(a) for a in jax.tree.leaves(state)]},
           meta)


def restored_trees(ckpt, params, state):
  """ckpt's (params, state), rebuilt on the templates' tree structures."""
  return tuple(
      jax.tree.unflatten(jax.tree.structure(template), ckpt.trees[name])
      for name, template in (("params", params), ("opt_state", state)))


# --------------------------------------------------------------- outputs
def metrics_json(metrics) -> bytes:
  return json.dumps(metrics, indent=2, sort_keys=True).encode()


def write_outputs(run, metrics):
  """curves.png, then metrics.json: an up-to-date metrics.json means an
  up-to-date plot."""
  run.write("curves.png", lambda f: plot(metrics, f))
  run.write("metrics.json", metrics_json(metrics))


def plot(metrics, f):
  from matplotlib.figure import Figure  # Agg canvas, no pyplot state

  history, config = metrics["history"], metrics["config"]
  fig = Figure(figsize=(7, 4), layout="constrained")
  ax = fig.subplots()
  steps = [e["step"] for e in history]
  train = np.array([e["train_loss"] for e in history])
  ax.plot(steps, train, alpha=0.3, color="C0")
  k = max(1, len(train) // 40)  # moving average over k steps
  smooth = np.convolve(train, np.ones(k) / k, mode="valid")
  ax.plot(steps[k - 1:], smooth, color="C0", label="train (objective)")
  evals = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e]
  if evals:
    ax.plot(*zip(*evals, strict=True), "o-", color="C1", label="held-out")
  ax.axhline(math.log(metrics["vocab_size"]), color="gray", ls=":",
             label="log V (uniform)")
  ax.set(xlabel="step", ylabel="loss (nats/token)", title=(
      f"{config['layers']} layers, d {config['d_model']}, V "
      f"{metrics['vocab_size']}, {config['head']} head, {config['data']}"))
  ax.legend()
  fig.savefig(f, format="png", dpi=100)


# ------------------------------------------------------------------ main
def fail(message: str, code: int = 2):
  """Exits with one line on stderr: code 2 refuses before training (flags,
  data, run directory), code 1 is a failure during training."""
  print(f"train_lm.py: error: {message}", file=sys.stderr, flush=True)
  raise SystemExit(code)


def main(argv: list[str] | None = None) -> int:
  started = time.monotonic()
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.d_model % args.heads:
    parser.error(f"--heads {args.heads} does not divide --d-model "
                 f"{args.d_model}")
  if args.vocab_parallel and args.head != "fused":
    parser.error("--vocab-parallel needs --head fused")
  sizes = args.mesh or {}
  n_model = sizes.get("model", 1)
  if n_model > 1 and not args.vocab_parallel:
    parser.error("--mesh model=M > 1 needs --vocab-parallel")
  if args.vocab_size % n_model:
    parser.error(f"--vocab-size {args.vocab_size} does not split over "
                 f"model={n_model} devices")
  init_distributed(args, parser)
  devices = jax.devices()  # every process's, when multi-process
  lead = jax.process_index() == 0  # the one process that writes files
  n_data = sizes.get("data", max(1, len(devices) // n_model))
  if n_data * n_model > len(devices):
    parser.error(f"--mesh data={n_data},model={n_model}: only "
                 f"{len(devices)} device{'s' * (len(devices) != 1)}")
  if jax.process_count() > 1 and (args.out is None
                                  or n_data * n_model < len(devices)):
    parser.error("a multi-process run needs --out (the same on every "
                 "process) and all devices in its mesh")
  mesh = jax.make_mesh(
      (n_data, n_model), ("data", "model"),
      axis_types=(AxisType.Explicit, AxisType.Explicit),
      devices=devices[:n_data * n_model])
  batch = -(-args.batch_size // n_data) * n_data
  if args.memory_only:
    print(f"JAX backend: {jax.default_backend()}; mesh data={n_data}, "
          f"model={n_model}")
    measure_heads(args, mesh, batch, args.vocab_size)
    return 0

  try:
    corpus = (stdlib_corpus() if args.text is None
              else text_corpus(args.text))
  except (OSError, ValueError) as e:
    fail(f"--text {args.text}: {e}")
  config = {
      "data": corpus.source, "data_sha256": corpus.fingerprint(),
      "vocab_size": args.vocab_size, "d_model": args.d_model,
      "layers": args.layers, "heads": args.heads, "seq_len": args.seq_len,
      "head": args.head, "chunk_size": args.chunk_size,
      "z_loss": args.z_loss, "steps": args.steps, "batch_size": batch,
      "lr": args.lr, "warmup": args.warmup,
      "weight_decay": args.weight_decay, "seed": args.seed,
      "eval_every": args.eval_every, "eval_batches": args.eval_batches,
      "devices": n_data,
      "vocab_parallel": n_model if args.vocab_parallel else None}
  out = args.out or Path("runs", time.strftime("lm-%Y%m%d-%H%M%S"))
  try:
    # The corpus is known by its fingerprint, not its path.
    with RunDir(out, config, prefix="step", free=("data",),
                keep=args.keep_checkpoints or None, writer=lead) as run:
      return train(args, run, corpus, config, mesh, started)
  except ConfigMismatch as e:
    fail(f"--out {out}: {e}; pass another --out, or the settings of the "
         "run there (--steps too: the learning rate's schedule spans the "
         "run's steps)")
  except RunDirError as e:
    fail(f"--out {out}: {e}")


def measure_heads(args, mesh, batch, vocab):
  """head_temp_bytes of both heads, printed as a table."""
  temps = {name: head_temp_bytes(
      make_head(name, args.chunk_size, mesh, args.vocab_parallel), mesh,
      batch, args.seq_len, args.d_model, vocab, args.z_loss)
      for name in ("fused", "optax")}
  print(memory_table(temps, batch, args.seq_len, args.d_model, vocab,
                     mesh.shape["data"], mesh.shape["model"]), flush=True)
  return temps


def train(args, run, corpus, config, mesh, started) -> int:
  """Tokenizes, resumes (or reports complete) and trains the run."""
  lead, batch, seq_len = run.writer, config["batch_size"], args.seq_len
  replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  backend = jax.default_backend()
  ckpt = run.restore()  # the settings are checked here, the arrays below
  for path, why in run.skipped if lead else ():
    print(f"skipped damaged checkpoint {path.name} ({why})"
          + (f", renamed {path.name}.corrupt" if run.writable else ""),
          file=sys.stderr, flush=True)
  train_docs, eval_docs = split_documents(len(corpus.texts))
  tok_path = run.path / "tokenizer.json"
  if ckpt is None and lead:  # a new run: (re)train the tokenizer
    run.require_writable()
    tokenizer = train_tokenizer([corpus.texts[i] for i in train_docs],
                                args.vocab_size)
    run.write(tok_path.name, tokenizer.to_str().encode())
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("train_lm.py: tokenizer.json")
  try:
    tokenizer = load_tokenizer(tok_path)
    tok_sha = fingerprint_file(tok_path)
  except Exception as e:  # missing, or not a tokenizer
    fail(f"--out {run.path}: cannot load {tok_path.name} ({e})")
  if ckpt is not None and ckpt.meta.get("tokenizer_sha256") != tok_sha:
    fail(f"--out {run.path}: {tok_path.name} is not the tokenizer its "
         "checkpoints were trained with; pass another --out")
  vocab = tokenizer.get_vocab_size()
  if vocab % mesh.shape["model"]:
    fail(f"--vocab-parallel: the vocabulary of {vocab} does not split over "
         f"model={mesh.shape['model']} devices; pass a --vocab-size that "
         "does (the BPE may yield fewer than asked on a small corpus)")
  train_x, train_y = to_rows(tokenizer, [corpus.texts[i] for i in train_docs],
                             seq_len)
  eval_x, eval_y = to_rows(tokenizer, [corpus.texts[i] for i in eval_docs],
                           seq_len)
  held_out = int(np.sum(eval_y != IGNORE))
  eval_x, eval_y = eval_rows(eval_x, eval_y, batch, args.eval_batches)
  n_data, n_model = mesh.shape["data"], mesh.shape["model"]
  print(f"JAX backend: {backend}; devices: {jax.devices()}")
  print(f"mesh data={n_data}, model={n_model}; corpus {corpus.source}: "
        f"{len(train_docs)} train files ({int(np.sum(train_y != IGNORE)):,} "
        f"tokens), {len(eval_docs)} held out ({held_out:,} tokens, "
        f"{int(np.sum(eval_y != IGNORE)):,} evaluated); vocabulary {vocab} "
        f"(log V = {math.log(vocab):.3f}); out: {run.path}", flush=True)
  if corpus.skipped:
    print(f"skipped {corpus.skipped} files that are not UTF-8",
          file=sys.stderr)

  model_cfg = ModelConfig(vocab, args.d_model, args.layers, args.heads,
                          seq_len)
  params = init_params(model_cfg, args.seed)
  schedule, optimizer = make_optimizer(args.lr, args.steps, args.warmup,
                                       args.weight_decay, params)
  state = strong(optimizer.init(params))
  start, metrics = 0, {}
  if ckpt is not None:
    ckpt = run.restore({"params": jax.tree.leaves(params),
                        "opt_state": jax.tree.leaves(state)})
    start, metrics = ckpt.step, ckpt.meta["metrics"]
    params, state = restored_trees(ckpt, params, state)
    if start > args.steps:
      fail(f"--out {run.path}: it holds {start} steps, more than --steps "
           f"{args.steps}")
    if start == args.steps:
      if lead and run.writable and not run.holds("metrics.json",
                                                 metrics_json(metrics)):
        write_outputs(run, metrics)  # e.g. killed between the two writes
      print(f"run in {run.path} is complete ({start} steps); nothing to do")
      return 0
  if lead:
    run.require_writable()  # before any work
  n_params = sum(a.size for a in jax.tree.leaves(params))
  print(f"model: {n_params:,} parameters, {args.layers} layers, d_model "
        f"{args.d_model}, {args.heads} heads, context {seq_len}; "
        f"{args.head} head; batch {batch} x {seq_len} tokens", flush=True)
  temps = measure_heads(args, mesh, batch, vocab)
  history = metrics.get("history", [])
  if start:
    print(f"resuming from step {start} ({run.checkpoint_path(start)})",
          flush=True)
  prompt = args.prompt if args.prompt is not None else (
      DEFAULT_PROMPT if args.text is None else "")
  head = make_head(args.head, args.chunk_size, mesh, args.vocab_parallel)
  with jax.set_mesh(mesh):
    params, state = jax.tree.map(lambda a: put(a, replicated),
                                 (params, state))
    step_fn = make_step(head, args.heads, args.z_loss, optimizer)
    eval_sum = make_eval(head, args.heads)
    eval_batches = [(put(eval_x[i:i + batch], rows),
                     put(eval_y[i:i + batch], rows))
                    for i in range(0, len(eval_x), batch)]
    timed_tokens, timed_seconds, throughput = 0, 0.0, None
    with tqdm(total=args.steps, initial=start, unit="step", disable=not lead,
              desc="train") as bar:
      for step in range(start + 1, args.steps + 1):
        tick = time.perf_counter()
        idx = batch_rows(step, batch, len(train_x), args.seed)
        (params, state), loss, gnorm = step_fn(
            params, state, put(train_x[idx], rows), put(train_y[idx], rows))
        entry = {"step": step, "train_loss": float(loss),
                 "lr": float(schedule(step - 1)), "grad_norm": float(gnorm)}
        if step > start + 1:  # this process's first step compiles
          timed_tokens += batch * seq_len
          timed_seconds += time.perf_counter() - tick
          throughput = timed_tokens / timed_seconds
        if step % args.eval_every == 0 or step == args.steps:
          entry["eval_loss"] = evaluate(eval_sum, params, eval_batches)
        history.append(entry)
        bar.set_postfix(
            refresh=False, loss=f"{entry['train_loss']:.3f}",
            **({"tok/s": f"{throughput:,.0f}"} if throughput else {}),
            **({"eval": f"{entry['eval_loss']:.3f}"}
               if "eval_loss" in entry else {}))
        bar.update()
        final = step == args.steps
        if not (final or step % args.checkpoint_every == 0):
          continue
        evals = [e["eval_loss"] for e in history if "eval_loss" in e]
        metrics = {
            "steps_completed": step, "train_loss": entry["train_loss"],
            "eval_loss": evals[-1] if evals else None,
            "log_vocab": math.log(vocab), "vocab_size": vocab,
            "tokens_per_second": throughput, "head_temp_bytes": temps,
            "backend": backend, "devices": n_data * n_model,
            "parameters": int(n_params),
            "train_tokens": int(np.sum(train_y != IGNORE)),
            "eval_tokens": int(np.sum(eval_y != IGNORE)),
            "config": config, "history": history,
            "sample": sample(params, tokenizer, prompt, args.sample_tokens,
                             args.heads, seq_len, args.seed, replicated)
            if final else None}
        if lead:
          try:
            save_checkpoint(run, step, params, state,
                            {"metrics": metrics, "tokenizer_sha256": tok_sha})
            write_outputs(run, metrics)
          except RunDirError as e:
            kept = run.checkpoints()
            fail(f"{e}; " + (f"the checkpoints up to step {kept[-1][0]} are "
                             "intact, rerun the same command to resume once "
                             "there is room" if kept else "no checkpoint "
                             "yet"), code=1)
  print(f"held-out loss {metrics['eval_loss']:.4f} nats/token (log V = "
        f"{math.log(vocab):.4f}) after {args.steps} steps, "
        f"{throughput or 0:,.0f} tokens/s "
        f"({time.monotonic() - started:.1f} s); wrote {run.path}/"
        "metrics.json, curves.png, checkpoints/")
  print(f"sample ({prompt!r} + up to {args.sample_tokens} tokens):\n"
        + metrics["sample"])
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
