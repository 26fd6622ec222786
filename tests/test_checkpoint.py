"""Checkpoints: exact resume in a new process, stage-2 init from stage 1, adapter export.

* Kill-and-resume: ``python -m kptjax.train`` runs N=4 steps in one process; a second
  workdir runs to N/2 and stops (``--preempt_at_step``), a NEW process resumes it. The
  losses of the last N/2 steps and the final params and optimizer state are identical
  (bit for bit): params, Adam moments, the Grain iterator and the dropout keys (LoRA
  dropout 0.1 here) all come back. The run is a stage-2 run (LoRA + projector) started
  from a stage-1 checkpoint, and exports ``adapter.safetensors``.
* Stage 2 initialized from a stage-1 checkpoint holds the stage-1 projector and towers
  exactly, with fresh LoRA factors (B = 0); a checkpoint of another model is refused.
* Saves fail where they fail (on a real small tmpfs): a full disk fails the background save
  of its step, named with its path by the next ``check`` within seconds, its partial dir
  removed; a read-only one fails ``save`` at once, before Orbax starts; the earlier
  checkpoint restores exactly either way, and the unfinished saves a killed run left are
  removed at start.
"""

import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from configs import tiny
from kptjax import convert, sharding
from kptjax.errors import CheckpointError
from kptjax.training import checkpoint, metrics_writer, trainer as trainer_lib
from kptjax.training.step import TrainState

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 4


def _one_device():
  return jax.make_mesh((1, 1, 1), sharding.MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=jax.devices()[:1])


def _flat(tree):
  return traverse_util.flatten_dict(jax.tree.map(np.asarray, jax.device_get(tree)))


def _leaves(tree):
  return {jax.tree_util.keystr(path): np.asarray(x)
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def _read_item(step_dir, item):
  """A saved pytree item read back with plain orbax (no kptjax code) as numpy."""
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.join(step_dir, item))


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
  """A stage-1 workdir (projector-only training, no LoRA) holding one checkpoint whose
  params are random numbers of the right shapes."""
  config = tiny.get_config()
  with config.unlocked():
    config.mesh.shape.data = 1
    config.optim.trainable = "projector"
    config.train.stage = 1
  trainer = trainer_lib.build(config, _one_device())
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(x.dtype),
                        trainer.abstract_params)
  state = trainer_lib.init_state(trainer, config, params=params)
  workdir = str(tmp_path_factory.mktemp("stage1"))
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), every=1, keep=1)
  ckpt.save(7, state)
  ckpt.wait()
  ckpt.close()
  return dict(workdir=workdir, params=traverse_util.flatten_dict(params))


def _stage2_config(init_from):
  config = tiny.get_config("lora")
  with config.unlocked():
    config.mesh.shape.data = 1
    config.checkpoints.init_from = init_from
  return config


def test_stage2_initializes_from_stage1(stage1):
  config = _stage2_config(stage1["workdir"])
  trainer = trainer_lib.build(config, _one_device())
  params = _flat(trainer_lib.init_state(trainer, config).params)
  saved = stage1["params"]
  projector = [k for k in params if k[0] == "projector"]
  assert projector
  for key in projector:
    np.testing.assert_array_equal(params[key], saved[key], err_msg="/".join(key))
  for key, value in saved.items():   # the frozen towers come from stage 1 too
    np.testing.assert_array_equal(params[key], value, err_msg="/".join(key))
  lora = [k for k in params if k not in saved]
  assert lora and all(k[-1] in ("lora_a", "lora_b") for k in lora)
  assert {k[0] for k in lora} == {"vit", "llm"}
  for key in lora:
    if key[-1] == "lora_b":
      assert not params[key].any()
    else:
      assert params[key].std() > 0


def test_init_from_another_model_is_refused(stage1):
  config = _stage2_config(stage1["workdir"])
  with config.unlocked():
    config.model.projector.kind = "mlp2x_gelu"
  trainer = trainer_lib.build(config, _one_device())
  zeros = jax.device_put(
      jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), trainer.abstract_params),
      trainer.state_shardings.params)
  with pytest.raises(CheckpointError, match="projector"):
    checkpoint.load_params(stage1["workdir"], zeros, trainer.state_shardings.params)
  with pytest.raises(CheckpointError):
    checkpoint.load_params(os.path.join(stage1["workdir"], "missing"), zeros,
                           trainer.state_shardings.params)


def _train_cli(workdir, init_from, *extra):
  """Starts ``python -m kptjax.train`` on one CPU device in a new process (with the
  session's compilation cache, conftest: the resuming process loads what the first two
  compiled)."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  cmd = [sys.executable, "-m", "kptjax.train", "--config", "configs/tiny.py:lora",
         "--workdir", workdir, f"--config.train.num_steps={N}",
         f"--config.train.checkpoint_every={N // 2}", "--config.train.log_every=1",
         "--config.model.lora.dropout=0.1", f"--config.checkpoints.init_from={init_from}",
         *extra]
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)


def _wait(*procs):
  for proc in procs:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]


def _losses(workdir):
  return {r["step"]: r["loss"] for r in metrics_writer.read_metrics(workdir) if "loss" in r}


def test_kill_and_resume_in_a_new_process_is_exact(stage1, tmp_path):
  full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
  # The uninterrupted run and the run that stops at N/2 are independent: run them together.
  _wait(_train_cli(full, stage1["workdir"]),
        _train_cli(resumed, stage1["workdir"], f"--preempt_at_step={N // 2}"))
  assert sorted(_losses(resumed)) == list(range(1, N // 2 + 1))
  assert checkpoint.Checkpointer(os.path.join(resumed, "checkpoints"), every=1,
                                keep=1).all_steps() == [N // 2]
  # Resume with init_from pointing nowhere: the state must come from the resumed
  # workdir only.
  _wait(_train_cli(resumed, str(tmp_path / "no_such_stage1")))

  want, got = _losses(full), _losses(resumed)
  assert sorted(want) == sorted(got) == list(range(1, N + 1))
  for step in range(N // 2 + 1, N + 1):
    assert got[step] == want[step], step
  for item in ("params", "opt_state"):
    a = _leaves(_read_item(os.path.join(full, "checkpoints", str(N)), item))
    b = _leaves(_read_item(os.path.join(resumed, "checkpoints", str(N)), item))
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=f"{item}{key}")

  # The run trained from stage 1: its frozen towers are stage 1's.
  final = _flat(_read_item(os.path.join(full, "checkpoints", str(N)), "params"))
  for key in (("llm", "embed_tokens", "embedding"), ("vit", "embeddings", "patch_kernel")):
    np.testing.assert_array_equal(final[key], stage1["params"][key])
  # The adapter export holds exactly the trained leaves, with their final values.
  adapter, _ = convert.load_params(os.path.join(full, "adapter.safetensors"))
  adapter = traverse_util.flatten_dict(adapter)
  assert adapter.keys() == {k for k in final if k[0] == "projector" or k[-1].startswith("lora_")}
  for key, value in adapter.items():
    np.testing.assert_array_equal(value, final[key])


def test_relative_workdir_saves_and_restores(tmp_path, monkeypatch):
  """'--workdir runs/x' is the usual CLI input; Orbax's OCDBT needs absolute paths."""
  import jax.numpy as jnp

  from kptjax.training import checkpoint as ckpt_lib
  monkeypatch.chdir(tmp_path)
  params = {"w": jnp.arange(4.0)}
  ck = ckpt_lib.Checkpointer("runs/x/checkpoints", every=1, keep=1)
  assert ck.directory.is_absolute()
  from kptjax.training.step import TrainState
  state = TrainState(step=jnp.ones((), jnp.int32), params=params, opt_state={"mu": params})
  ck.save(1, state, None, force=True)
  ck.wait()
  ck.close()
  loaded, _ = ckpt_lib.load_params("runs/x", {"w": jnp.zeros(4)},
                                   {"w": jax.sharding.SingleDeviceSharding(jax.devices()[0])})
  np.testing.assert_array_equal(loaded["w"], params["w"])


def _random_state(seed):
  """A TrainState of 2 x 200k random float32 (~1.6 MB uncompressed)."""
  rng = np.random.default_rng(seed)
  w = jax.numpy.asarray(rng.normal(size=200_000).astype(np.float32))
  return TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params={"w": w},
                    opt_state={"mu": w + 1})


def _restored_w(directory, step):
  state = _random_state(0)
  target = checkpoint.abstract(state, jax.tree.map(lambda x: x.sharding, state))
  with_ck = checkpoint.Checkpointer(directory, every=1, keep=5)
  try:
    return np.asarray(with_ck.restore(target, step=step).params["w"])
  finally:
    with_ck.close()


def _saved_once(mount_tmpfs):
  """(tmpfs, its checkpoints dir, a Checkpointer on it, the state saved there as step 1)."""
  disk = mount_tmpfs("disk", "8m")
  directory = disk / "checkpoints"
  ck = checkpoint.Checkpointer(directory, every=1, keep=5)
  first = _random_state(0)
  ck.save(1, first, force=True)
  ck.wait()
  return disk, directory, ck, first


def test_full_disk_fails_at_its_step_and_keeps_the_earlier_checkpoint(mount_tmpfs):
  disk, directory, ck, first = _saved_once(mount_tmpfs)
  # Fill the disk up to half a checkpoint's size: the 4 KiB write probe still passes, the
  # background save of step 2 cannot.
  used = shutil.disk_usage(disk).used
  free = shutil.disk_usage(disk).free
  with open(disk / "filler", "wb") as f:
    f.write(b"\0" * (free - used // 2))
  t0 = time.perf_counter()
  assert ck.save(2, _random_state(1), force=True)   # returns: the arrays write in the background
  with pytest.raises(CheckpointError) as info:
    while time.perf_counter() - t0 < 60:
      ck.check()
      time.sleep(0.05)
  assert time.perf_counter() - t0 < 60
  message = str(info.value)
  assert "\n" not in message
  assert message.startswith(f"{directory}/2: saving the checkpoint of step 2 failed: the disk "
                            "is full")
  assert "removed the partial 2.orbax-checkpoint-tmp" in message
  assert message.endswith("earlier checkpoints untouched: [1]")
  assert sorted(os.listdir(directory)) == ["1"]
  ck.wait()   # the error was raised once
  ck.close()

  # A killed run's unfinished save is removed when the next run starts; step 1 restores.
  os.remove(disk / "filler")
  (directory / "3.orbax-checkpoint-tmp-1234" / "params").mkdir(parents=True)
  np.testing.assert_array_equal(_restored_w(directory, 1), np.asarray(first.params["w"]))
  assert sorted(os.listdir(directory)) == ["1"]


def test_read_only_workdir_fails_in_one_line_at_once(mount_tmpfs):
  disk, directory, ck, first = _saved_once(mount_tmpfs)
  subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
  t0 = time.perf_counter()
  with pytest.raises(CheckpointError, match=rf"^{directory}: cannot write checkpoints: "
                     r"read-only file system \(\[Errno 30\][^\n]*$"):
    ck.save(2, _random_state(1), force=True)
  with pytest.raises(CheckpointError, match="read-only file system"):
    checkpoint.Checkpointer(directory, every=1, keep=5)
  assert time.perf_counter() - t0 < 30
  ck.close()
  subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
  np.testing.assert_array_equal(_restored_w(directory, 1), np.asarray(first.params["w"]))
