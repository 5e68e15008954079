"""Run directories for resumable training: lock, atomic files, verified
checkpoints, config and data identity.

A run directory holds one training run: ``checkpoints/<prefix>_<step>.npz``
(one per saved step) plus whatever files the trainer writes through
``RunDir.write`` (``metrics.json``, plots). NumPy and the standard library
only; nothing is ever unpickled. A trainer uses it like this::

    from rundir import ConfigMismatch, RunDir, RunDirError, fingerprint

    config = {"lr": 0.1, ..., "data_sha256": fingerprint({"X": X, "y": y})}
    try:
      with RunDir(out, config, prefix="step", keep=3) as run:
        ckpt = run.restore({"params": leaves(params),   # None: a fresh run
                            "opt_state": leaves(state)})
        for path, why in run.skipped:                   # corrupt, ignored
          print(f"skipped {path.name}: {why}")
        run.require_writable()
        ...
        run.save(step, {"params": leaves(params),
                        "opt_state": leaves(state)}, {"history": history})
        run.write("metrics.json", text.encode())
    except RunDirError as e:                           # one-line message
      sys.exit(f"error: --out {out}: {e}")

What it guarantees:

* **One run at a time.** ``open`` (``with``) takes an exclusive
  ``fcntl.flock`` on ``<dir>/.lock``, which holds the holder's pid. The
  kernel drops the lock when the process exits, however it dies, so there
  is never a stale lock; a second process is refused (``RunDirError``
  naming the holder's pid). Only the holder writes or deletes anything:
  under the lock ``open`` deletes the ``*.tmp`` files a killed run left
  behind, so it never deletes another run's in-flight file. A process that
  cannot open the lock file for writing (a read-only directory) takes no
  lock and is read-only (``writable`` is false).
* **Atomic files.** ``atomic_write`` writes a temporary file in the same
  directory, fsyncs it, renames it onto its name and fsyncs the
  directory: a kill at any moment leaves the old file or the new one.
* **Verified checkpoints.** ``save`` stores each tree's leaves as
  ``<tree>/<i>`` arrays (any dtype, bfloat16 included, restored bit for
  bit), with the step, the config, a JSON ``meta`` dict and a SHA-256
  ``fingerprint`` of all of them. ``restore`` walks from the newest
  checkpoint down and returns the first that loads and whose checksum
  matches; the newer ones are listed in ``skipped`` with a reason
  (truncated, empty, not a zip, missing array, flipped bytes) and renamed
  ``<name>.corrupt`` by a writer, kept for inspection and reported once.
  Pruning only counts checkpoints up to the step just saved. Files not
  named exactly ``<prefix>_<digits>.npz`` (``epoch_0001 (copy).npz``) are
  ignored, except another prefix's ``<other>_<digits>.npz``: another
  program's run, which ``restore`` refuses. ``Checkpoint.trees`` holds
  NumPy arrays; rebuild a pytree with
  ``jax.tree.unflatten(jax.tree.structure(template), leaves)``.
* **Identity.** ``restore`` raises ``ConfigMismatch`` (a ``RunDirError``)
  when the verified checkpoint was written with another config, keys in
  ``free`` excepted (settings that may change between sessions, such as
  the data file's path when the data's fingerprint is in the config).
* **Writability** is probed by ``open`` (``writable``, ``unwritable``);
  ``require_writable`` raises before any work is done, so a read-only
  directory can still be restored from and reported on. Every write
  failure (a full disk) is a ``RunDirError`` naming the file; what was
  written before stays loadable.
* **Pruning.** ``save`` keeps the ``keep`` newest checkpoints (``None``:
  all).

A process that only reads (``writer=False``: the non-lead processes of a
multi-process run, whose lead writes) takes no lock, deletes and renames
nothing and never writes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np

__all__ = ["Checkpoint", "ConfigMismatch", "RunDir", "RunDirError",
           "atomic_write", "fingerprint", "fingerprint_file"]

LOCK_NAME = ".lock"
CHECKPOINTS = "checkpoints"
_UMASK = os.umask(0o022)  # read it (set and restore) once, at import
os.umask(_UMASK)
_STEP, _CONFIG, _META, _DTYPES, _CHECKSUM = (
    "__step__", "__config__", "__meta__", "__dtypes__", "__checksum__")


class RunDirError(Exception):
  """A run directory cannot be used; the message is one line for a user."""


class ConfigMismatch(RunDirError):
  """The run directory holds a run with other settings.

  ``changed`` maps each differing key to ``(there, here)``; ``step`` is the
  step of the verified checkpoint that holds them.
  """

  def __init__(self, changed: dict[str, tuple[Any, Any]], step: int):
    self.changed, self.step = changed, step
    super().__init__("it holds a run with other settings (" + ", ".join(
        f"{k}: {_short(a)} there, {_short(b)} here"
        for k, (a, b) in changed.items()) + ")")


class Checkpoint(NamedTuple):
  """A verified checkpoint: its step, file, trees (name -> list of leaf
  arrays, in the order saved), meta dict and config."""
  step: int
  path: Path
  trees: dict[str, list[np.ndarray]]
  meta: dict[str, Any]
  config: dict[str, Any]


def fingerprint(arrays: Mapping[str, Any]) -> str:
  """SHA-256 (hex) of named arrays: names, dtypes, shapes and bytes.

  Equal for equal arrays however they were stored or where; used for the
  data identity in a config and as the checksum of a checkpoint.
  """
  h = hashlib.sha256()
  for name in sorted(arrays):
    a = np.asarray(arrays[name])
    h.update(json.dumps([name, _dtype_name(a.dtype), a.shape]).encode())
    h.update(a.tobytes(order="C"))
  return h.hexdigest()


def fingerprint_file(path: str | os.PathLike) -> str:
  """SHA-256 (hex) of a file's bytes, read in 1 MiB blocks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(1 << 20):
      h.update(block)
  return h.hexdigest()


def atomic_write(path: Path, data: bytes | Callable[[BinaryIO], None]
                 ) -> None:
  """Writes data (bytes, or a function writing to a binary file) to path
  atomically: a temp file ``<name>.<random>.tmp`` beside it is written,
  fsynced and renamed onto path, then the directory is fsynced. The file
  gets the permissions ``open`` would give it (0o666 less the umask).
  Raises OSError; the temp file is removed on any failure."""
  path = Path(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".",
                             suffix=".tmp")
  try:
    os.fchmod(fd, 0o666 & ~_UMASK)
    with os.fdopen(fd, "wb") as f:
      if callable(data):
        data(f)
      else:
        f.write(data)
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


def _dtype_name(dtype: np.dtype) -> str:
  """dtype.str, or the name of a dtype NumPy does not know itself (such as
  ml_dtypes' bfloat16, whose .str is a bare '<V2')."""
  return dtype.name if dtype.isbuiltin == 2 else dtype.str


def _named_dtype(name: str) -> np.dtype:
  """The dtype of a _dtype_name (importing ml_dtypes, which JAX uses, for
  bfloat16 and float8 types)."""
  try:
    return np.dtype(name)
  except TypeError:
    import ml_dtypes  # noqa: F401  registers its dtypes' names
    return np.dtype(name)


def _short(value):
  """Config values for messages: long hashes cut to 12 characters."""
  if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{40,}", value):
    return value[:12] + "..."
  return value


def _why(error: BaseException) -> str:
  """One line describing an error: its type and first line, if any."""
  text = str(error).strip().splitlines()
  return type(error).__name__ + (f": {text[0][:120]}" if text else "")


def _io_error(what: str, path: Path, error: OSError) -> RunDirError:
  return RunDirError(f"cannot {what} {path}: "
                     f"{error.strerror or _why(error)}")


class RunDir:
  """One run directory; see the module docstring.

  Args:
    path: the directory (created with its parents if missing).
    config: JSON-serializable settings that identify the run (include a
      ``fingerprint`` of the data); stored in every checkpoint.
    prefix: checkpoint files are ``<prefix>_<step, width digits>.npz``.
    width: digits of the zero-padded step in checkpoint names.
    keep: newest checkpoints kept by ``save`` (``None``: all).
    free: config keys that may differ from the stored run's.
    writer: whether this process writes (and locks); ``False`` for the
      processes of a multi-process run that only read.
  """

  def __init__(self, path: str | os.PathLike, config: Mapping[str, Any], *,
               prefix: str = "step", width: int = 8, keep: int | None = 3,
               free: Sequence[str] = (), writer: bool = True):
    if keep is not None and keep < 1:
      raise ValueError(f"keep must be >= 1 or None, got {keep}")
    self.path = Path(path)
    self.checkpoint_dir = self.path / CHECKPOINTS
    self.config = json.loads(json.dumps(dict(config), sort_keys=True))
    self.prefix, self.width, self.keep = prefix, width, keep
    self.free, self.writer = frozenset(free), writer
    self.skipped: list[tuple[Path, str]] = []
    self.unwritable: str | None = "not opened"
    self._lock_fd: int | None = None
    self._pattern = re.compile(re.escape(prefix) + r"_(\d+)\.npz")
    self._any_pattern = re.compile(r"(.+)_\d+\.npz")

  # ------------------------------------------------------------ lifetime
  def open(self) -> RunDir:
    """Creates the directory, locks it, probes writability and removes
    the temp files of killed writes (writer only). Raises RunDirError."""
    if not self.writer:
      self.unwritable = "this process does not write"
      return self
    try:
      self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:
      raise RunDirError(f"{e.filename} exists and is not a directory"
                        ) from None
    except OSError as e:
      raise _io_error("create", self.checkpoint_dir, e) from None
    self.unwritable = self._lock()
    if self.unwritable is None:
      for d in (self.path, self.checkpoint_dir):
        for partial in d.glob("*.tmp"):  # left by a kill mid-write
          with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    return self

  def close(self) -> None:
    """Releases the lock (the kernel also does when the process ends)."""
    if self._lock_fd is not None:
      os.close(self._lock_fd)
      self._lock_fd = None

  def __enter__(self) -> RunDir:
    return self.open()

  def __exit__(self, *exc) -> None:
    self.close()

  def _lock(self) -> str | None:
    """Takes the lock; returns why this process may not write (None: it
    may). Only a process holding the lock writes or deletes anything, so
    one that cannot open the lock file for writing is read-only."""
    lock = self.path / LOCK_NAME
    try:
      fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      return self._probe() or (f"cannot open {lock} for writing "
                               f"({e.strerror or _why(e)})")
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise _io_error("lock", lock, e) from None
      try:
        pid = lock.read_text().strip()
      except OSError:
        pid = ""
      raise RunDirError(
          f"another run {'(pid ' + pid + ') ' if pid else ''}holds its "
          f"lock ({lock}); wait for it to end, or use another "
          "directory") from None
    self._lock_fd = fd
    with contextlib.suppress(OSError):  # the holder's pid, for the message
      os.ftruncate(fd, 0)
      os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return self._probe()

  def _probe(self) -> str | None:
    """None if files can be created in both directories, else why not."""
    for d in (self.path, self.checkpoint_dir):
      try:
        fd, probe = tempfile.mkstemp(dir=d, prefix=".probe.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
      except OSError as e:
        return f"{d} is not writable ({e.strerror or _why(e)})"
    return None

  @property
  def writable(self) -> bool:
    return self.unwritable is None

  def require_writable(self) -> None:
    """Raises RunDirError unless this process may write here."""
    if self.unwritable is not None:
      raise RunDirError(self.unwritable)

  # --------------------------------------------------------------- files
  def write(self, name: str, data: bytes | Callable[[BinaryIO], None]
            ) -> Path:
    """``atomic_write`` of path/name; any failure is a RunDirError."""
    path = self.path / name
    self.require_writable()
    try:
      atomic_write(path, data)
    except OSError as e:
      raise _io_error("write", path, e) from None
    return path

  def holds(self, name: str, data: bytes) -> bool:
    """Whether path/name exists and holds exactly data (so that a finished
    run can be reported without writing)."""
    try:
      return (self.path / name).read_bytes() == data
    except OSError:
      return False

  def write_if_changed(self, name: str, data: bytes) -> bool:
    """Writes data to path/name unless the file already holds exactly
    that; returns whether it wrote."""
    if self.holds(name, data):
      return False
    self.write(name, data)
    return True

  # --------------------------------------------------------- checkpoints
  def checkpoint_path(self, step: int) -> Path:
    return self.checkpoint_dir / f"{self.prefix}_{step:0{self.width}d}.npz"

  def checkpoints(self) -> list[tuple[int, Path]]:
    """(step, path) of every file named like a checkpoint, by step."""
    found = []
    with contextlib.suppress(FileNotFoundError):
      for path in self.checkpoint_dir.iterdir():
        if m := self._pattern.fullmatch(path.name):
          found.append((int(m[1]), path))
    return sorted(found)

  def save(self, step: int, trees: Mapping[str, Sequence[Any]],
           meta: Mapping[str, Any] | None = None) -> Path:
    """Writes checkpoint ``step`` atomically and prunes to ``keep``.

    trees maps a name (no ``/``) to a sequence of numeric arrays (a
    pytree's leaves, ``jax.tree.leaves``; device arrays are copied to the
    host); meta is JSON (floats round-trip exactly). Raises RunDirError if
    it cannot be written; the checkpoints saved before stay loadable.
    """
    arrays: dict[str, Any] = {
        _STEP: np.int64(step),
        _CONFIG: np.str_(json.dumps(self.config, sort_keys=True)),
        _META: np.str_(json.dumps(dict(meta or {})))}  # keys in order
    for name, leaves in trees.items():
      if "/" in name or name.startswith("__"):
        raise ValueError(f"tree name {name!r}: no '/', no leading '__'")
      for i, leaf in enumerate(leaves):
        arrays[f"{name}/{i}"] = a = np.asarray(leaf)
        if a.dtype.hasobject:  # would be pickled, and never loaded
          raise ValueError(f"{name}/{i}: an array of Python objects")
    # .npy stores bfloat16 and the like as raw void: record their names.
    arrays[_DTYPES] = np.str_(json.dumps(
        {k: a.dtype.name for k, a in arrays.items()
         if a.dtype.isbuiltin == 2}, sort_keys=True))
    arrays[_CHECKSUM] = np.str_(fingerprint(arrays))
    path = self.checkpoint_path(step)
    self.write(f"{CHECKPOINTS}/{path.name}",
               lambda f: np.savez(f, **arrays))
    if self.keep is not None:
      older = [p for s, p in self.checkpoints() if s <= step]
      for old in older[:-self.keep]:
        with contextlib.suppress(FileNotFoundError):
          old.unlink()
    return path

  def load(self, path: Path) -> Checkpoint:
    """Reads and verifies one checkpoint file; raises ValueError (or the
    reader's own error) if it is damaged."""
    with open(path, "rb") as raw, np.load(raw, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
    if _CHECKSUM not in arrays or _DTYPES not in arrays:
      raise ValueError("no checksum")
    for key, name in json.loads(str(arrays[_DTYPES])).items():
      arrays[key] = arrays[key].view(_named_dtype(name))
    stored = str(arrays.pop(_CHECKSUM))
    if fingerprint(arrays) != stored:
      raise ValueError("checksum mismatch")
    trees: dict[str, dict[int, np.ndarray]] = {}
    for key, a in arrays.items():
      if not key.startswith("__"):
        name, _, i = key.rpartition("/")
        trees.setdefault(name, {})[int(i)] = a
    return Checkpoint(
        int(arrays[_STEP]), path,
        {n: [t[i] for i in range(len(t))] for n, t in trees.items()},
        json.loads(str(arrays[_META])), json.loads(str(arrays[_CONFIG])))

  def restore(self, templates: Mapping[str, Sequence[Any]] | None = None
              ) -> Checkpoint | None:
    """The newest checkpoint that loads and verifies, or None.

    Damaged checkpoints newer than it are listed in ``skipped`` (and, by a
    writer, renamed ``<name>.corrupt``). Raises ConfigMismatch if it holds
    other settings (``free`` keys aside), and RunDirError if its trees do
    not match templates (name -> leaves: count, shapes and dtypes), which
    means that another program, or version, wrote it, or if the directory
    holds checkpoints of another prefix (``<other>_<digits>.npz``: another
    program's run, whose files this one's would overwrite).
    """
    self.skipped = []
    with contextlib.suppress(FileNotFoundError):
      for path in sorted(self.checkpoint_dir.iterdir()):
        m = self._any_pattern.fullmatch(path.name)
        if m and m[1] != self.prefix:
          raise RunDirError(
              f"it holds another program's checkpoints ({path.name}, not "
              f"{self.prefix}_*.npz); use another directory")
    found = None
    for step, path in reversed(self.checkpoints()):
      try:
        ckpt = self.load(path)
        if ckpt.step != step:
          raise ValueError(f"holds step {ckpt.step}")
      except Exception as e:  # any damage: try the next one
        self.skipped.append((path, _why(e)))
        continue
      found = ckpt
      break
    if found is not None:
      keys = sorted((self.config.keys() | found.config.keys()) - self.free)
      if changed := {k: (found.config.get(k), self.config.get(k))
                     for k in keys
                     if found.config.get(k) != self.config.get(k)}:
        raise ConfigMismatch(changed, found.step)
      if templates is not None:
        self._match(found, templates)
    if self.writer and self.writable:
      for path, _ in self.skipped:
        with contextlib.suppress(OSError):
          os.replace(path, path.with_name(path.name + ".corrupt"))
    return found

  @staticmethod
  def _match(ckpt: Checkpoint, templates: Mapping[str, Sequence[Any]]
             ) -> None:
    def spec(leaves):  # no copy of device arrays to the host
      return [(tuple(np.shape(a)), np.dtype(
          a.dtype if hasattr(a, "dtype") else np.asarray(a).dtype))
              for a in leaves]
    for name, leaves in templates.items():
      if spec(ckpt.trees.get(name, [])) != spec(leaves):
        raise RunDirError(
            f"{ckpt.path.name}: its {name!r} arrays do not match this "
            "program's (written by another program or version?)")
