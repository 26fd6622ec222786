"""Orbax checkpoints of the train state and the Grain iterator; stage-1 init; adapter export.

Layout of ``WORKDIR/checkpoints/<step>/``:
  params/     the full param tree (sharded arrays, OCDBT)
  opt_state/  optimizer state of the trainable leaves
  data/       ``process_<i>-of-<n>.json``: each process's Grain iterator state

Restoring all three gives a run that continues exactly where the saved one stopped:
same params, same optimizer moments, same next batch, same dropout keys (they derive
from the step).

Saves fail where they fail, in one line naming the path and the cause: the directory is
created and a probe file written (synchronously) when the ``Checkpointer`` is made and
before every save, so a read-only or full workdir stops the run at once instead of in
Orbax's background thread; an error of a background save is raised by the next
``check`` (the train loop calls it every step) or ``wait``, naming the step that made it,
and that step's partial ``<step>.orbax-checkpoint-tmp*`` dir is removed. Stale tmp dirs of
an earlier, killed run are removed at start. Finished checkpoints are never touched.
"""

from __future__ import annotations

import errno
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils

from kptjax.errors import CheckpointError
from kptjax.models.lora import LORA_LEAVES
from kptjax.training.step import TrainState

Params = dict[str, Any]

CHECKPOINT_SUBDIR = "checkpoints"
TMP_SUFFIX = ".orbax-checkpoint-tmp"   # Orbax's name for a save not yet finalized
_PROBE = ".kptjax-write-probe"


def _root(directory: str | os.PathLike) -> epath.Path:
  # Orbax writes OCDBT stores, which need absolute paths ('runs/x' is the usual CLI input).
  d = os.fspath(directory)
  return epath.Path(d if "://" in d else os.path.abspath(d))


def saved_steps(directory: str | os.PathLike) -> list[int]:
  """The finished checkpoint steps under ``directory``, sorted; writes nothing (a missing
  directory has none)."""
  root = _root(directory)
  if not root.exists():
    return []
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir())


def _reason(e: BaseException) -> str:
  """One line saying why a write failed: the OS error, and 'the disk is full' /
  'read-only file system' when that is the cause."""
  text = (f"[Errno {e.errno}] {e.strerror}: {e.filename}" if isinstance(e, OSError)
          and e.strerror else str(e).strip().splitlines()[0] if str(e).strip() else repr(e))
  if len(text) > 400:
    text = text[:400] + " ..."
  code = getattr(e, "errno", None)
  if code == errno.ENOSPC or "No space left" in str(e) or "os_error_code='28'" in str(e):
    text = f"the disk is full ({text})"
  elif code == errno.EROFS or "Read-only file system" in str(e):
    text = f"read-only file system ({text})"
  return text


def check_writable(directory: str | os.PathLike) -> None:
  """Creates ``directory`` (and parents) and writes and removes a 4 KiB probe file in it.

  Raises:
    CheckpointError: in one line, naming the directory and the OS error (read-only,
      permission denied, no space left).
  """
  root = _root(directory)
  probe = root / f"{_PROBE}-{jax.process_index()}"
  try:
    root.mkdir(parents=True, exist_ok=True)
    probe.write_bytes(b"\0" * 4096)
    probe.unlink()
  except OSError as e:
    raise CheckpointError(f"{root}: cannot write checkpoints: {_reason(e)}") from None


def remove_tmp_dirs(directory: str | os.PathLike, step: int | None = None) -> list[str]:
  """Removes unfinished saves (``<step>.orbax-checkpoint-tmp*``) of ``step`` (default:
  all) under ``directory``; returns their names. Finished step dirs are not touched."""
  root = _root(directory)
  if not root.exists():
    return []
  prefix = "" if step is None else f"{step}{TMP_SUFFIX}"
  removed = []
  for p in root.iterdir():
    if TMP_SUFFIX in p.name and p.name.startswith(prefix):
      p.rmtree() if p.is_dir() else p.unlink()
      removed.append(p.name)
  return sorted(removed)


def abstract(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying shardings: the restore target (nothing is allocated)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def _handlers() -> dict[str, Any]:
  return dict(params=ocp.StandardCheckpointHandler(), opt_state=ocp.StandardCheckpointHandler(),
              data=grain.checkpoint.CheckpointHandler())


class Checkpointer:
  """Saves every ``every`` steps, keeps the last ``keep``, restores the latest.

  Args:
    directory: the checkpoint root, e.g. ``WORKDIR/checkpoints``.
    every: save interval in steps (``save`` with ``force=True`` saves off-interval).
    keep: number of checkpoints kept (older ones are deleted).
    async_save: write arrays in a background thread (the data-iterator state is
      captured before ``save`` returns either way).
  """

  def __init__(self, directory: str | os.PathLike, *, every: int, keep: int,
               async_save: bool = True):
    self.directory = _root(directory)
    if jax.process_index() == 0:
      check_writable(self.directory)
      stale = remove_tmp_dirs(self.directory)
      if stale:
        logging.warning("%s: removed unfinished saves of an earlier run: %s", self.directory,
                        stale)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("kptjax_checkpointer_prepared")
    self._pending: int | None = None   # the step of a background save not yet checked
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=max(int(every), 1), max_to_keep=keep,
            enable_async_checkpointing=async_save),
        item_handlers=_handlers())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: TrainState, data_iter: Any | None = None, *,
           force: bool = False) -> bool:
    """Saves ``state`` (and the iterator that produced its last batch) as ``step``.

    Returns:
      Whether a checkpoint was written (False off the save interval unless ``force``).

    Raises:
      CheckpointError: the directory cannot be written (checked before the save starts),
        or the previous background save failed (naming its step).
    """
    self.wait()   # Orbax waits for the previous save anyway; here its error is named
    check_writable(self.directory)
    items = dict(params=ocp.args.StandardSave(state.params),
                 opt_state=ocp.args.StandardSave(state.opt_state))
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    try:
      saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
    except (OSError, ValueError) as e:   # the synchronous part (directory creation, ...)
      self._failed(step, e)
    self._pending = step if saved else None
    return saved

  def _failed(self, step: int | None, e: BaseException):
    removed = remove_tmp_dirs(self.directory, step) if jax.process_index() == 0 else []
    kept = saved_steps(self.directory)
    where = self.directory if step is None else self.directory / str(step)
    raise CheckpointError(
        f"{where}: saving the checkpoint of step {step} failed: "
        f"{_reason(e)}" + (f"; removed the partial {removed[0]}" if removed else "")
        + f"; earlier checkpoints untouched: {kept or 'none'}") from e

  def check(self) -> None:
    """Raises the error of a finished background save, if any (does not block)."""
    if self._pending is not None and not self._manager.is_saving_in_progress():
      self.wait()

  def restore(self, abstract_state: TrainState, data_iter: Any | None = None,
              step: int | None = None) -> TrainState:
    """Restores ``step`` (default: the latest) into the shapes and shardings of the target.

    Args:
      abstract_state: a TrainState of ShapeDtypeStructs with shardings (``abstract``).
      data_iter: a fresh iterator of the same dataset; its state is set in place.
      step: which checkpoint.

    Returns:
      The restored TrainState; its ``step`` is the checkpoint's step.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"{self.directory}: no checkpoint to restore")
    items = dict(params=ocp.args.StandardRestore(abstract_state.params),
                 opt_state=ocp.args.StandardRestore(abstract_state.opt_state))
    if data_iter is not None:
      if not (self.directory / str(step) / "data").exists():
        raise CheckpointError(f"{self.directory}/{step}: no data-iterator state saved")
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise CheckpointError(f"{self.directory}/{step}: cannot restore the train state: {e}") from e
    step_arr = jax.device_put(jax.numpy.asarray(step, jax.numpy.int32),
                              abstract_state.step.sharding)
    return TrainState(step=step_arr, params=out["params"], opt_state=out["opt_state"])

  def wait(self) -> None:
    """Blocks until the background writes have finished.

    Raises:
      CheckpointError: the background save failed (naming its step, the path and why).
    """
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
      self._manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-exception-caught
      self._failed(step, e)

  def close(self) -> None:
    self._manager.close()


def _manager_root(path: str | os.PathLike) -> epath.Path:
  """A stage-1 workdir or its ``checkpoints`` dir -> the CheckpointManager root."""
  path = os.fspath(path)
  path = epath.Path(path if "://" in path else os.path.abspath(path))
  if (path / CHECKPOINT_SUBDIR).is_dir():
    return path / CHECKPOINT_SUBDIR
  if path.is_dir():
    return path
  raise CheckpointError(f"{path}: not a checkpoint directory or a workdir holding "
                        f"'{CHECKPOINT_SUBDIR}/'")


def latest_step(path: str | os.PathLike) -> int | None:
  """The newest finished checkpoint step under a workdir or its ``checkpoints`` dir
  (None when there is none); what ``load_params`` restores by default."""
  root = _manager_root(path)
  with ocp.CheckpointManager(root, item_handlers=_handlers(),
                             options=ocp.CheckpointManagerOptions(read_only=True)) as mngr:
    return mngr.latest_step()


def load_params(path: str | os.PathLike, params: Params, shardings: Params,
                step: int | None = None) -> tuple[Params, list[str]]:
  """Overwrites ``params`` with the leaves saved in a checkpoint (stage 2 from stage 1).

  Every leaf in the checkpoint must exist in ``params`` with the same shape (it is cast
  to the dtype of ``params``); leaves missing from the checkpoint keep their values, and
  only LoRA factors (which a stage-1 run does not have) may be missing.

  Args:
    path: a workdir, or its ``checkpoints`` dir; the latest step unless ``step``.
    params: the current (initialized) params.
    shardings: NamedShardings shaped like ``params``.
    step: which checkpoint.

  Returns:
    (params, names of the LoRA leaves that were NOT in the checkpoint, '/'-joined).
  """
  root = _manager_root(path)
  with ocp.CheckpointManager(root, item_handlers=_handlers(),
                             options=ocp.CheckpointManagerOptions(read_only=True)) as mngr:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"{root}: no checkpoint found")
    meta = mngr.item_metadata(step)["params"]
    saved = traverse_util.flatten_dict(getattr(meta, "tree", meta))
    flat = traverse_util.flatten_dict(params)
    flat_sh = traverse_util.flatten_dict(shardings)
    target = {}
    for key, meta in saved.items():
      name = "/".join(key)
      if key not in flat:
        raise CheckpointError(f"{root}/{step}: param '{name}' is not in the model "
                              f"(is the model config the one stage 1 used?)")
      if tuple(meta.shape) != flat[key].shape:
        raise CheckpointError(f"{root}/{step}: param '{name}' has shape {tuple(meta.shape)}, "
                              f"the model expects {flat[key].shape}")
      target[key] = jax.ShapeDtypeStruct(flat[key].shape, flat[key].dtype, sharding=flat_sh[key])
    missing = sorted("/".join(k) for k in flat if k not in saved)
    not_lora = [name for name in missing if name.rsplit("/", 1)[-1] not in LORA_LEAVES]
    if not_lora:
      raise CheckpointError(f"{root}/{step}: params {not_lora[:5]} (of {len(not_lora)}) are "
                            "not in the checkpoint; only LoRA factors may be missing")
    restored = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(
        traverse_util.unflatten_dict(target))))["params"]
  flat.update(traverse_util.flatten_dict(restored))
  logging.info("Loaded %d params from %s/%d; %d kept their init: %s", len(saved), root, step,
               len(missing), missing[:8])
  return traverse_util.unflatten_dict(flat), missing
