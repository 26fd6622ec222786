"""kptjax.train with model.kpt.enabled: KptLLM model, its batch fields and step, the task
pipeline over the synthetic objects; the step lowers against the abstract batch, and a
two-step run trains and checkpoints."""

import jax
import numpy as np
import pytest

from configs import tiny
from kptjax import sharding, train
from kptjax.models import factory


def _config(root):
  c = tiny.get_config("lora").unlock()
  c.model.kpt.enabled = True
  c.model.remat_policy = "none"
  c.data.train.update(source="synthetic_objects", path=str(root), num_images=8)
  c.data.update(tasks="semantic:1,visual:1,textual:1", shots=1, rounds=2, max_len=160,
                coord_format="keypoint_token", read_threads=1)
  c.data.augment.flip_prob = 0.0
  c.train.update(batch_size=2, num_steps=2, log_every=1, checkpoint_every=2)
  c.mesh.shape.data = 1
  return c.lock()


def test_build_dispatches_and_step_lowers_on_the_pipeline_batch(tmp_path):
  config = _config(tmp_path)
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  trainer = train.build(config, mesh)
  assert type(trainer.model).__name__ == "KptLLM"
  assert "keypoint_head" in trainer.abstract_params
  abstract = factory.abstract_batch(config, mesh)
  batch = next(iter(train.make_dataset(config)))
  assert set(factory.batch_keys(config)) <= set(batch)
  for key, spec in abstract.items():
    assert batch[key].shape == spec.shape and batch[key].dtype == spec.dtype, key
  with jax.set_mesh(mesh):
    lowered = trainer.step.lower(train.abstract_state(trainer), abstract)
  assert "keypoints" in lowered.out_info[1] and "l1" in lowered.out_info[1]


def test_two_step_run_trains_and_checkpoints(tmp_path):
  config = _config(tmp_path / "data").unlock()
  config.data.tasks = "visual:1,textual:1"         # every row has a <keypoint> target
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  workdir = tmp_path / "work"
  state = train.run(config, str(workdir), mesh=mesh)
  assert int(state.step) == 2
  rows = [r for r in train.read_metrics(str(workdir)) if "l1" in r]
  assert [r["step"] for r in rows] == [1, 2]
  assert all(np.isfinite(r["loss"]) and r["keypoints"] > 0 for r in rows)
  assert (workdir / "checkpoints").is_dir() and (workdir / "adapter.safetensors").exists()
