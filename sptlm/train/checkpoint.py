"""Orbax checkpoints of a run: train state, data iterator state and resolved config.

Saves are asynchronous and keep the newest `keep` steps. Every checkpoint carries a manifest
(MANIFEST: each file's size and checksum), written by process 0 after all processes have
finished writing and before Orbax commits the step, so a committed step always has one.

What restoring does with a checkpoint, and why (the promise: a good checkpoint is never moved):
- Proven damaged: a file that its manifest lists is missing, has another size or another
  checksum; or, for a step without a manifest (an older sptlm), its Orbax metadata is missing
  or unreadable. Only such a step is moved to DIR/corrupt_checkpoints/ (never deleted; the same
  step quarantined twice is kept twice, as N and N.1), and the step before it is tried.
- Not fitting the config (a tree, shape or dtype mismatch, read from the checkpoint's
  metadata before any array): a user error. `CheckpointMismatch` names the first differing
  array, both shapes and the config keys that differ from the config the checkpoint was saved
  with; nothing is moved or written.
- A transient I/O error (permission, timeout, connection reset): retried with backoff, then
  `CheckpointUnreadable`; nothing is moved.
- Any other failure of a step that passed its checks: `CheckpointUnreadable`, left in place.
Process 0 decides which step to restore and broadcasts it, so every host resumes the same step.
"""

import dataclasses
import errno
import json
import logging
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from sptlm import paths
from sptlm.errors import MissingFileError, UserError

log = logging.getLogger(__name__)

MANIFEST = "sptlm_manifest.json"
QUARANTINE = "corrupt_checkpoints"
_UNCHECKED = ("_CHECKPOINT_METADATA", "commit_success.txt", MANIFEST)  # rewritten at commit
_TRANSIENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.ETIMEDOUT, errno.ECONNRESET,
                     errno.ECONNREFUSED, errno.ECONNABORTED, errno.EAGAIN, errno.EINTR,
                     errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EBUSY, errno.ESTALE}
_TRANSIENT_TEXT = ("DEADLINE_EXCEEDED", "UNAVAILABLE", "PERMISSION_DENIED", "Permission denied",
                   "timed out", "Timeout", "Connection reset", "Too Many Requests", " 503 ",
                   " 429 ")
T = TypeVar("T")


class CheckpointMismatch(UserError):
  """The checkpoint holds other arrays than the config builds (a changed or mistyped key)."""


class CheckpointUnreadable(UserError):
  """A checkpoint that could not be read, though it is not proven damaged; left in place."""


class DiskFull(UserError):
  """No space left while writing the run's files; what was committed before is intact."""


def is_transient(error: BaseException) -> bool:
  """Whether an I/O error may go away by itself (permissions, timeouts, a flaky network)."""
  for e in _chain(error):
    if isinstance(e, FileNotFoundError):
      return False
    if isinstance(e, (TimeoutError, ConnectionError)):
      return True
    if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
      return True
    if any(t in str(e) for t in _TRANSIENT_TEXT):
      return True
  return False


def is_disk_full(error: BaseException) -> bool:
  return any((isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
             or "No space left on device" in str(e) for e in _chain(error))


def _chain(error: BaseException) -> Iterator[BaseException]:
  seen = set()
  e: BaseException | None = error
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def retry(fn: Callable[[], T], what: str, *, attempts: int = 5, delay_s: float = 1.0) -> T:
  """fn(), retried with exponential backoff while its errors are transient."""
  for i in range(attempts):
    try:
      return fn()
    except Exception as e:  # noqa: BLE001 - classified below
      if not is_transient(e):
        raise
      if i == attempts - 1:
        raise CheckpointUnreadable(
            f"{what} failed {attempts} times with a transient I/O error ({type(e).__name__}: "
            f"{_first_line(e)}); nothing was moved or deleted: rerun when the storage is "
            "reachable") from e
      wait = delay_s * 2 ** i
      log.warning("%s: %s: %s; retrying in %.0f s", what, type(e).__name__, _first_line(e), wait)
      time.sleep(wait)
  raise AssertionError("unreachable")


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:300] if text else type(e).__name__


def _digest(path: epath.Path) -> dict[str, Any]:
  """A file's size and checksum: CRC-32 of the bytes locally; an object store's own checksum
  (GCS keeps a CRC32C of every object) where there is one, so nothing is read back."""
  if "://" in str(path):
    import fsspec
    fs, p = fsspec.core.url_to_fs(str(path))
    info = fs.info(p)
    out = {"size": int(info["size"])}
    for key in ("crc32c", "md5Hash", "ETag"):
      if info.get(key):
        out[key] = str(info[key])
        break
    return out
  crc, size = 0, 0
  with open(str(path), "rb") as f:
    while chunk := f.read(1 << 22):
      crc = zlib.crc32(chunk, crc)
      size += len(chunk)
  return {"size": size, "crc32": f"{crc:08x}"}


def _files(root: epath.Path) -> Iterator[epath.Path]:
  for p in sorted(root.iterdir()):
    if p.is_dir():
      yield from _files(p)
    else:
      yield p


def write_manifest(step_dir: epath.Path) -> None:
  """Records every file's size and checksum in step_dir/MANIFEST."""
  files = {str(p.relative_to(step_dir)): _digest(p) for p in _files(step_dir)
           if p.name not in _UNCHECKED}
  (step_dir / MANIFEST).write_text(json.dumps({"format": 1, "files": files}, indent=0))


def damage(step_dir: epath.Path) -> str | None:
  """Why the checkpoint in step_dir is proven damaged, or None. Transient errors propagate."""
  manifest = step_dir / MANIFEST
  if manifest.exists():
    try:
      files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
      return f"its manifest {MANIFEST} is unreadable"
    for rel, want in files.items():
      p = step_dir / rel
      try:
        got = _digest(p)
      except FileNotFoundError:
        return f"{rel} is missing"
      if got["size"] != want["size"]:
        return f"{rel} has {got['size']} bytes, {want['size']} were written"
      if got != want:
        return f"{rel} fails its checksum"
    return None
  # No manifest (written by an older sptlm): only what Orbax itself needs is checked.
  for rel in ("_CHECKPOINT_METADATA", "state/_METADATA"):
    p = step_dir / rel
    try:
      json.loads(p.read_text())
    except FileNotFoundError:
      return f"{rel} is missing"
    except ValueError:
      return f"{rel} is unreadable"
  return None


@dataclasses.dataclass(frozen=True)
class _Leaf:
  path: str
  shape: tuple[int, ...]
  dtype: str


def _key_name(k: Any) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def leaf_name(path: Sequence[Any]) -> str:
  """A tree path as "params/layers/0/kernel": the same for a saved and a live tree."""
  return "/".join(_key_name(k) for k in path)


def _leaves(tree: Any) -> list[_Leaf]:
  return [_Leaf(leaf_name(path), tuple(getattr(leaf, "shape", ())),
                str(getattr(leaf, "dtype", type(leaf).__name__)))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def compare_trees(saved: Any, wanted: Any) -> str | None:
  """The first difference between the checkpoint's arrays and the config's, or None."""
  have = {x.path: x for x in _leaves(saved)}
  want = {x.path: x for x in _leaves(wanted)}
  # Parameters first: they name the model key that changed (optimizer moments mirror them).
  for path, w in sorted(want.items(), key=lambda kv: not kv[0].startswith("params")):
    h = have.get(path)
    if h is None:
      return f"{path} {w.shape} is in the config's model but not in the checkpoint"
    if h.shape != w.shape:
      return f"{path} is {w.shape} in the config but {h.shape} in the checkpoint"
    if h.dtype != w.dtype:
      return f"{path} is {w.dtype} in the config but {h.dtype} in the checkpoint"
  extra = sorted(set(have) - set(want))
  if extra:
    return f"{extra[0]} {have[extra[0]].shape} is in the checkpoint but not in the config's model"
  return None


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, dict):
    out = {}
    for k, v in d.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: d}


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """'key: old -> new' for every config key whose value differs."""
  a, b = _flatten(old), _flatten(new)
  return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}"
          for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


class Checkpointer:
  """One run's checkpoint directory (local path or gs://).

  The data iterator is anything grain's checkpoint handler takes: a grain DatasetIterator, or
  an object with get_state() -> bytes, set_state(bytes) and start_prefetch(); each process
  writes its own iterator state. One with set_states(list) gets every process's saved state
  on restore (text_input.ShardedBatches: it then resumes on another number of hosts).
  """

  def __init__(self, workdir: str, *, keep: int, async_save: bool, retry_delay_s: float = 1.0,
               read_only: bool = False):
    self.workdir = paths.absolute(workdir)  # Orbax wants absolute paths
    self.directory = self.workdir / "checkpoints"
    self.async_save = async_save
    self.retry_delay_s = retry_delay_s
    self._saving: int | None = None  # the step whose save is in flight
    if read_only:  # another run's directory (train.init_from): create and clean up nothing
      self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
          read_only=True, create=False))
      return
    # Always Orbax's async checkpointer: its post-finalization hook writes the manifest inside
    # the step before the commit. A synchronous save waits for it.
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=True, create=True,
            cleanup_tmp_directories=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._finalize)))

  # ---- Saving ------------------------------------------------------------------------------
  def save(self, step: int, state: Any, data_iter: Any, config_json: str) -> None:
    """Starts saving `step` (and waits for it unless async). A full disk raises DiskFull."""
    self.wait()  # the previous save's errors are that step's
    self._saving = step  # before the save: its finalization (another thread) reads it
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=grain.checkpoint.CheckpointSave(data_iter),
          config=ocp.args.JsonSave(json.loads(config_json))), force=True)
      if not self.async_save:
        self.wait()
    except Exception as e:
      self._raise_if_disk_full(e, step)
      raise

  def _finalize(self) -> None:
    """After every process wrote step `_saving`, before Orbax commits it: its manifest."""
    if jax.process_index() != 0 or self._saving is None:
      return
    step = self._saving
    tmp = sorted(self.directory.glob(f"{step}.orbax-checkpoint-tmp*"))
    write_manifest(tmp[-1] if tmp else self.directory / str(step))

  def wait(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      self._raise_if_disk_full(e, self._saving)
      raise
    self._saving = None

  def _raise_if_disk_full(self, e: Exception, step: int | None) -> None:
    if is_disk_full(e):
      before = [s for s in self.manager.all_steps() if step is None or s < step]
      kept = f"step {max(before)}" if before else "none yet"
      raise DiskFull(f"no space left on device under {self.directory} while saving the "
                     f"checkpoint of step {step}; the last complete checkpoint ({kept}) is "
                     "intact: free space, then rerun the same command to resume from it") from e

  def close(self) -> None:
    self.manager.close()

  # ---- Restoring ---------------------------------------------------------------------------
  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore(self, abstract_state: Any, data_iter: Any | None,
              config: dict[str, Any] | None = None) -> tuple[int, Any] | None:
    """(step, state) of the newest undamaged checkpoint, `data_iter` set in place; None if
    there is none. `config` (the run's resolved config) explains a mismatch."""
    step = self._agreed_step()
    if step is None:
      return None
    self.check_fits(step, abstract_state, config)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    every_process = data_iter is not None and hasattr(data_iter, "set_states")
    if data_iter is not None and not every_process:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self._read(step, lambda: self.manager.restore(
        step, args=ocp.args.Composite(**items)))
    if every_process:  # all processes' iterator files: the host count may have changed
      data_dir = self.directory / str(step) / "data"
      states = self._read(step, lambda: [
          f.read_text() for f in sorted(data_dir.glob("process_*-of-*.json"))])
      data_iter.set_states(states)
    return step, restored["state"]

  def restore_state(self, step: int, abstract_state: Any) -> Any:
    """Only the train state of one step (for init_from and conversion)."""
    self.check_fits(step, abstract_state, None)
    restored = self._read(step, lambda: self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state))))
    return restored["state"]

  def restore_matching(self, step: int, abstract_state: Any, prefixes: tuple[str, ...]
                       ) -> tuple[dict[str, jax.Array], list[str]]:
    """(name -> array for each leaf under `prefixes` that the checkpoint holds, the names it
    lacks): train.init_partial. A leaf it holds in another shape or dtype is a mismatch."""
    path = self.directory / str(step) / "state"
    saved = retry(lambda: ocp.StandardCheckpointHandler().metadata(path),
                  f"reading the metadata of {path}", delay_s=self.retry_delay_s)
    saved = getattr(saved, "tree", saved)
    want = {x.path: x for x in _leaves(abstract_state) if x.path.startswith(prefixes)}
    sharding = {leaf_name(p): leaf.sharding for p, leaf in
                jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    item: dict[Any, Any] = {}
    for p, meta in jax.tree_util.tree_flatten_with_path(saved)[0]:
      name, w = leaf_name(p), want.get(leaf_name(p))
      if w is None:
        continue
      got = _Leaf(name, tuple(meta.shape), str(meta.dtype))
      if (got.shape, got.dtype) != (w.shape, w.dtype):
        raise CheckpointMismatch(
            f"checkpoint {self.directory / str(step)}: {name} is {got.shape} {got.dtype} there "
            f"but {w.shape} {w.dtype} in the config; train.init_partial only adds arrays")
      node = item
      for k in p[:-1]:
        node = node.setdefault(_key_name(k), {})
      node[_key_name(p[-1])] = jax.ShapeDtypeStruct(w.shape, meta.dtype, sharding=sharding[name])
    if not item:
      raise CheckpointMismatch(f"checkpoint {self.directory / str(step)} holds none of the "
                               f"config's {', '.join(prefixes)} arrays")
    restored = self._read(step, lambda: ocp.PyTreeCheckpointer().restore(
        path, args=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True)))
    got = {leaf_name(p): a for p, a in jax.tree_util.tree_flatten_with_path(restored)[0]}
    return got, sorted(set(want) - set(got))

  def _read(self, step: int, fn: Callable[[], T]) -> T:
    try:
      return retry(fn, f"reading checkpoint {self.directory / str(step)}",
                   delay_s=self.retry_delay_s)
    except CheckpointUnreadable:
      raise
    except Exception as e:  # noqa: BLE001 - passed its checks, so not proven damaged
      raise CheckpointUnreadable(
          f"checkpoint {self.directory / str(step)} passed its integrity check but failed to "
          f"restore ({type(e).__name__}: {_first_line(e)}); it was left in place. If you know "
          f"it is damaged, move it into {self.workdir / QUARANTINE}/ and rerun") from e

  def _agreed_step(self) -> int | None:
    """Process 0 checks the steps newest first, quarantines the damaged ones and broadcasts
    its choice; every process restores that step."""
    choice = -1
    if jax.process_index() == 0:
      for step in sorted(self.manager.all_steps(), reverse=True):
        why = retry(lambda s=step: damage(self.directory / str(s)),
                    f"checking checkpoint {self.directory / str(step)}",
                    delay_s=self.retry_delay_s)
        if why is None:
          choice = step
          break
        self._quarantine(step, why)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      choice = int(multihost_utils.broadcast_one_to_all(np.int32(choice)))
    self.manager.reload()
    return None if choice < 0 else choice

  def check_fits(self, step: int, abstract_state: Any, config: dict[str, Any] | None) -> None:
    """Raises CheckpointMismatch when the saved arrays are not the ones the config builds."""
    path = self.directory / str(step) / "state"
    saved = retry(lambda: ocp.StandardCheckpointHandler().metadata(path),
                  f"reading the metadata of {path}", delay_s=self.retry_delay_s)
    saved = getattr(saved, "tree", saved)
    diff = compare_trees(saved, abstract_state)
    if diff is None:
      return
    keys = ""
    if config is not None:
      old = self.saved_config(step)
      if old is not None:
        changed = [d for d in config_diff(old, config) if not d.startswith("train.")]
        keys = (f"; the config differs from the one it was saved with in: "
                f"{', '.join(changed[:6]) or 'no model key'}")
    raise CheckpointMismatch(
        f"checkpoint {self.directory / str(step)} does not fit the config: {diff}{keys}. "
        "Nothing was changed: rerun with the run's own config, or use a new --workdir (with "
        f"--config.train.init_from={self.workdir} only where the shapes agree)")

  def saved_config(self, step: int) -> dict[str, Any] | None:
    """The resolved config saved with `step` (its `config` item), if readable."""
    try:
      return json.loads((self.directory / str(step) / "config" / "metadata").read_text())
    except (OSError, ValueError):
      return None

  def _quarantine(self, step: int, why: str) -> None:
    """Moves a damaged step to DIR/corrupt_checkpoints/N (N.1, N.2, ... if N is taken)."""
    src = self.directory / str(step)
    parent = self.workdir / QUARANTINE
    parent.mkdir(parents=True, exist_ok=True)
    dst, i = parent / str(step), 0
    while dst.exists():
      i += 1
      dst = parent / f"{step}.{i}"
    log.warning("checkpoint %s is damaged (%s); moving it to %s and using the one before it",
                src, why, dst)
    src.rename(dst)


def load_newest(workdir: str, abstract_state: Callable[[jax.sharding.Mesh], Any],
                mesh: jax.sharding.Mesh | None = None) -> tuple[int, Any]:
  """(step, train state) of a run's newest checkpoint on `mesh` (default: one device), opened
  read-only (the run may still be going); `abstract_state(mesh)` builds what to restore into."""
  ckpt = Checkpointer(workdir, keep=2, async_save=False, read_only=True)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise MissingFileError(f"{workdir} has no checkpoint yet; train first")
    if mesh is None:
      mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1),
                               ("data", "fsdp", "tensor"))
    return step, ckpt.restore_state(step, abstract_state(mesh))
  finally:
    ckpt.close()
