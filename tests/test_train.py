"""The training loop (kptjax.training.trainer.run) on configs/tiny.py, on one CPU device.

* a run over-fits two fixed batches of the real pipeline: the loss falls from its value
  at init (ln 512 for the tiny vocabulary) by more than 40% in 20 steps;
* the periodic evaluation hook is called with the live state and its metrics are
  written; every logged step has loss / accuracy / lr / grad_norm / step time / tokens/s;
* a NaN loss stops the run with an error naming the step and what its batch held (NaN
  inputs, token ids past the vocabulary) instead of guessing;
* a workdir belongs to one model: resuming it with another width stops before anything
  is built or written, listing the differing fields (``model_config.json`` unchanged);
  a field listed in ``train.resume_may_change`` may change; a workdir without
  ``model_config.json`` is refused by the restore and gets none written;
* a workdir that turns read-only mid-run stops the run at the next save in one line
  within seconds (not after Orbax's 300 s timeout), and a resume on it stops at once;
  the earlier checkpoint stays restorable;
* stage 1: LLaVA-style caption pairs become batches of the same contract (loss on the
  caption and </s> only) that the train step accepts;
* a real run on the COCO sample with one of its images corrupt completes, counting the
  skipped persons in metrics.jsonl; ``python -m kptjax.train --strict`` stops at it;
* with model.kpt.enabled the trainer builds KptLLM, its batch fields and step over the
  task pipeline of the synthetic objects: the step lowers against the abstract batch, and
  a two-step run trains (loss, l1, keypoints logged) and checkpoints.
"""

import glob
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import time

import grain
import jax
import numpy as np
import pytest

from configs import tiny
from kptjax import sharding
from kptjax.data import pipeline, tokenizer
from kptjax.errors import CheckpointError, ConfigError
from kptjax.models import factory
from kptjax.training import checkpoint, metrics_writer, trainer as trainer_lib

REPO = pathlib.Path(__file__).resolve().parents[1]

NUM_STEPS = 20
EVAL_EVERY = 10


def _config():
  config = tiny.get_config()
  with config.unlocked():
    config.optim.update(lr=2e-2, warmup_ratio=0.0, schedule="constant")
    config.train.update(num_steps=NUM_STEPS, log_every=1, checkpoint_every=NUM_STEPS,
                        eval_every=EVAL_EVERY)
  return config


def _fixed_batches(config, n):
  """n batches of the real pipeline, repeated forever, as a checkpointable grain dataset."""
  it = iter(pipeline.make_train_dataset(config, tokenizer.load_tokenizer("")))
  batches = [{k: next(it)[k] for k in factory.BATCH_KEYS} for _ in range(n)]
  return grain.MapDataset.source(batches).repeat().to_iter_dataset(), batches


@pytest.fixture(scope="module")
def trainer(one_device):
  return trainer_lib.build(_config(), one_device)


@pytest.fixture(scope="module")
def overfit(tmp_path_factory, trainer):
  config = _config()
  dataset, batches = _fixed_batches(config, 2)
  workdir = str(tmp_path_factory.mktemp("overfit"))
  calls = []

  def eval_fn(state, step):
    calls.append((step, int(jax.device_get(state.step))))
    return {"answer_tokens_seen": float(step * batches[0]["loss_mask"].sum())}

  state = trainer_lib.run(config, workdir, eval_fn=eval_fn, dataset=dataset, trainer=trainer)
  rows = metrics_writer.read_metrics(workdir)
  return dict(workdir=workdir, state=state, calls=calls, rows=rows, batches=batches)


def test_one_step_then_loss_falls_when_overfitting(overfit):
  losses = {r["step"]: r["loss"] for r in overfit["rows"] if "loss" in r}
  assert sorted(losses) == list(range(1, NUM_STEPS + 1))
  assert losses[1] == pytest.approx(math.log(512), abs=0.3)   # random init: uniform-ish
  # Both batches (alternating) are fit: the last two losses average < 60% of the first.
  assert (losses[NUM_STEPS] + losses[NUM_STEPS - 1]) / 2 < 0.6 * losses[1]
  assert int(jax.device_get(overfit["state"].step)) == NUM_STEPS


def test_logged_metrics(overfit):
  rows = [r for r in overfit["rows"] if "loss" in r]
  first = rows[0]
  assert first["answer_tokens"] == overfit["batches"][0]["loss_mask"].sum()
  assert first["lr"] == pytest.approx(2e-2)
  assert 0.0 <= first["accuracy"] <= 1.0 and first["grad_norm"] > 0
  for r in rows[1:]:   # step 1 includes compilation and is not timed
    assert r["step_time"] > 0 and r["tokens_per_sec"] > 0
  assert glob.glob(os.path.join(overfit["workdir"], "events.out.tfevents.*"))
  assert os.path.isdir(os.path.join(overfit["workdir"], "checkpoints", str(NUM_STEPS)))


def test_eval_hook_called_with_live_state(overfit):
  steps = list(range(EVAL_EVERY, NUM_STEPS + 1, EVAL_EVERY))
  assert overfit["calls"] == [(s, s) for s in steps]
  evals = {r["step"]: r["eval/answer_tokens_seen"] for r in overfit["rows"]
           if "eval/answer_tokens_seen" in r}
  assert sorted(evals) == steps


def test_nan_loss_stops_with_clear_error(tmp_path, trainer):
  config = _config()
  dataset, _ = _fixed_batches(config, 1)
  poisoned = dataset.map(lambda b: {**b, "image": np.full_like(b["image"], np.nan)})
  n_image = dataset_first(poisoned)["image"].size
  with pytest.raises(FloatingPointError, match=rf"loss is nan at step 1, on the batch of step 1 "
                     rf".*the batch has non-finite inputs: image {n_image} NaN/inf values$"):
    trainer_lib.run(config, str(tmp_path), dataset=poisoned, trainer=trainer)
  assert not os.path.isdir(os.path.join(tmp_path, "checkpoints", "1"))


def dataset_first(dataset):
  return next(iter(dataset))


def test_nan_loss_from_token_ids_past_the_vocabulary_says_so(tmp_path, trainer):
  """Ids past the 512-row table read jnp.take's NaN fill: the message names the ids, not
  the learning rate."""
  config = _config()
  dataset, _ = _fixed_batches(config, 1)

  def past_the_table(b):
    tokens = b["tokens"].copy()
    tokens[b["loss_mask"] > 0] = 600   # every answer token
    return {**b, "tokens": tokens}
  bad = dataset.map(past_the_table)
  n_bad = int((dataset_first(dataset)["loss_mask"] > 0).sum())
  with pytest.raises(FloatingPointError, match=rf"loss is nan at step 1.*token ids outside "
                     rf"the vocabulary \[0, 512\) .*: tokens {n_bad} ids \(min 0, max 600\)$"
                     ) as info:
    trainer_lib.run(config, str(tmp_path), dataset=bad, trainer=trainer)
  assert "optim.lr" not in str(info.value)


def _snapshot(workdir):
  """{relative path: bytes} of every file under workdir."""
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, workdir)] = f.read()
  return out


def test_resume_with_another_width_is_refused(overfit, tmp_path, trainer, monkeypatch):
  workdir = str(tmp_path / "run")
  shutil.copytree(overfit["workdir"], workdir)
  before = _snapshot(workdir)
  config = _config()
  with config.unlocked():
    config.model.llm.hidden_size = 64
    config.model.dtype = "bfloat16"
  monkeypatch.setattr(trainer_lib, "build", lambda *a, **k: pytest.fail("built before the check"))
  with pytest.raises(ConfigError, match=r"model_config\.json: this workdir holds another "
                     r"model: model\.dtype \(saved 'float32', requested 'bfloat16'\), "
                     r"model\.llm\.hidden_size \(saved 32, requested 64\)\. ") as info:
    trainer_lib.run(config, workdir, dataset=_fixed_batches(config, 1)[0])
  assert "train.resume_may_change" in str(info.value)
  assert _snapshot(workdir) == before   # nothing written, model_config.json included
  monkeypatch.undo()

  # A field listed in train.resume_may_change may change; the workdir then records it.
  config = _config()
  with config.unlocked():
    config.model.remat_policy = "none"
    config.train.resume_may_change = "model.remat_policy"
  state = trainer_lib.run(config, workdir, dataset=_fixed_batches(config, 1)[0], trainer=trainer)
  assert int(jax.device_get(state.step)) == NUM_STEPS
  with open(os.path.join(workdir, "model_config.json"), encoding="utf-8") as f:
    assert json.load(f)["remat_policy"] == "none"


def test_resume_without_model_config_writes_nothing_when_restore_fails(overfit, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(overfit["workdir"], workdir)
  os.remove(os.path.join(workdir, "model_config.json"))
  config = _config()
  with config.unlocked():
    config.model.llm.hidden_size = 64
  with pytest.raises(CheckpointError, match="cannot restore the train state"):
    trainer_lib.run(config, workdir, dataset=_fixed_batches(config, 1)[0],
              mesh=jax.make_mesh((1, 1, 1), sharding.MESH_AXES, devices=jax.devices()[:1],
                                 axis_types=(jax.sharding.AxisType.Auto,) * 3))
  assert not os.path.exists(os.path.join(workdir, "model_config.json"))


def test_read_only_workdir_mid_run_fails_at_the_next_save(tmp_path, trainer, mount_tmpfs):
  """checkpoints/ is a tmpfs remounted read-only after the save of step 2 (by the eval
  hook at step 3); the save of step 4 stops the run in one line naming it."""
  workdir = tmp_path / "run"
  disk = mount_tmpfs("run/checkpoints", "64m")
  config = _config()
  with config.unlocked():
    config.train.update(num_steps=6, checkpoint_every=2, eval_every=3)
  turned = {}

  def turn_read_only(state, step):
    del state
    if step == 3:
      while not (disk / "2").is_dir() or any(".orbax-checkpoint-tmp" in p for p in
                                             os.listdir(disk)):
        time.sleep(0.05)   # the background save of step 2 finalizes
      subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
      turned["at"] = time.perf_counter()

  dataset, _ = _fixed_batches(config, 2)
  with pytest.raises(CheckpointError) as info:
    trainer_lib.run(config, str(workdir), eval_fn=turn_read_only, dataset=dataset, trainer=trainer)
  assert time.perf_counter() - turned["at"] < 60
  message = str(info.value)
  assert message.startswith(f"{disk}: cannot write checkpoints: read-only file system")
  assert "\n" not in message
  assert _losses_logged(workdir) == [1, 2, 3, 4]

  # A resume on the read-only workdir stops before anything is built.
  t0 = time.perf_counter()
  with pytest.raises(CheckpointError, match="read-only file system"):
    trainer_lib.run(config, str(workdir), dataset=dataset, trainer=trainer)
  assert time.perf_counter() - t0 < 30
  subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
  ckpt = checkpoint.Checkpointer(disk, every=1, keep=2)
  restored = ckpt.restore(trainer_lib.abstract_state(trainer), step=2)
  ckpt.close()
  assert int(jax.device_get(restored.step)) == 2


def _losses_logged(workdir):
  return [r["step"] for r in metrics_writer.read_metrics(str(workdir)) if "loss" in r]


def test_stage1_caption_batches(tmp_path, trainer, shared_data):
  captions = ["a man throws a frisbee in a park", "two people ride skis down a snowy hill"]
  images = ["000000000785.jpg", "000000040083.jpg"]
  ann = tmp_path / "chat.json"
  ann.write_text(json.dumps([
      {"id": str(i), "image": img, "conversations": [
          {"from": "human", "value": "<image>\nDescribe the image."},
          {"from": "gpt", "value": cap}]} for i, (img, cap) in enumerate(zip(images, captions))]))
  config = _config()
  with config.unlocked():
    config.data.train.update(source="llava", ann_file=str(ann),
                             image_root=str(shared_data / "coco"))
    config.optim.trainable = "projector"
    config.train.stage = 1
  batch = next(iter(trainer_lib.make_dataset(config)))
  b, t = batch["tokens"].shape
  side = config.model.vit.image_size
  assert batch["image"].shape == (b, side, side, 3) and b == config.train.batch_size
  assert batch["input_mask"].shape == batch["loss_mask"].shape == (b, t)
  tok = tokenizer.load_tokenizer("")
  n_image = (side // config.model.vit.patch_size) ** 2
  seen = set()
  for row in range(b):
    tokens, mask = batch["tokens"][row], batch["loss_mask"][row]
    assert (tokens == config.model.image_token_id).sum() == n_image
    supervised = batch["targets"][row][mask > 0]
    assert supervised[-1] == tok.eos_token_id
    np.testing.assert_array_equal(batch["targets"][row][:-1], tokens[1:])
    seen.add(tok.decode(supervised[:-1]).strip())
  assert seen == set(captions)

  # The stage-1 batch goes through the same compiled step.
  state = trainer_lib.init_state(trainer, config)
  state, metrics = trainer.step(state, sharding.shard_batch(
      {k: batch[k] for k in factory.BATCH_KEYS}, trainer.mesh))
  assert np.isfinite(float(metrics["loss"]))
  assert float(metrics["answer_tokens"]) == batch["loss_mask"].sum()


# ------------------------------------------------------------- a corrupt training image


@pytest.fixture(scope="module")
def corrupt_coco(tmp_path_factory, shared_data):
  """The COCO sample's annotations over copies of its images, one cut to 2 kB (a JPEG
  whose header reads but whose pixels do not decode), and that image's path."""
  root = tmp_path_factory.mktemp("coco_corrupt")
  for src in (shared_data / "coco").glob("*.jpg"):
    shutil.copy(src, root / src.name)
  bad = root / "000000196141.jpg"
  bad.write_bytes(bad.read_bytes()[:2048])
  return shared_data / "coco" / "test_coco.json", root, bad


def _coco_config(ann, root, steps):
  config = _config()
  with config.unlocked():
    config.data.train.update(source="coco", ann_file=str(ann), image_root=str(root))
    config.train.update(num_steps=steps, checkpoint_every=steps, eval_every=0)
  return config


def test_corrupt_image_is_skipped_and_counted_in_a_real_run(tmp_path, trainer, corrupt_coco):
  ann, root, bad = corrupt_coco
  steps = 4
  config = _coco_config(ann, root, steps)
  state = trainer_lib.run(config, str(tmp_path), trainer=trainer)
  assert int(jax.device_get(state.step)) == steps
  rows = [r for r in metrics_writer.read_metrics(str(tmp_path)) if "loss" in r]
  assert [r["step"] for r in rows] == list(range(1, steps + 1))
  assert all(np.isfinite(r["loss"]) for r in rows)
  # Expected count from the shuffled stream of the 12 persons: how often one on the
  # corrupt image comes up before the last of the 4 x 4 persons trained on.
  records = pipeline.load_records(config, "train")
  on_bad = {i for i, r in enumerate(records) if r.image_path == str(bad)}
  assert len(records) == 12 and len(on_bad) == 4       # 5 people there, 1 unlabeled
  stream = grain.MapDataset.source(list(range(12))).shuffle(seed=config.seed).repeat()
  order = [stream[i] for i in range(64)]
  kept = [j for j, item in enumerate(order) if item not in on_bad][:steps * 4]
  expected = sum(item in on_bad for item in order[:kept[-1]])
  counts = [r["skipped_images"] for r in rows]
  assert counts == sorted(counts) and counts[-1] == expected > 0


def test_strict_flag_stops_a_real_run_at_the_corrupt_image(tmp_path, corrupt_coco):
  ann, root, bad = corrupt_coco
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  cmd = [sys.executable, "-m", "kptjax.train", "--config", "configs/tiny.py",
         "--workdir", str(tmp_path / "run"), "--strict", "--config.data.train.source=coco",
         f"--config.data.train.ann_file={ann}", f"--config.data.train.image_root={root}",
         "--config.train.num_steps=4", "--config.train.checkpoint_every=4"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "ImageError" in proc.stderr and f"{bad}, field 'image'" in proc.stderr, \
      proc.stderr[-3000:]
  assert not os.path.isdir(tmp_path / "run" / "checkpoints" / "4")


# ------------------------------------------------------------------------- KptLLM
def _kpt_config(root):
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


def test_kptllm_build_dispatches_and_step_lowers_on_the_pipeline_batch(tmp_path):
  config = _kpt_config(tmp_path)
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  trainer = trainer_lib.build(config, mesh)
  assert type(trainer.model).__name__ == "KptLLM"
  assert "keypoint_head" in trainer.abstract_params
  abstract = factory.abstract_batch(config, mesh)
  batch = next(iter(trainer_lib.make_dataset(config)))
  assert set(factory.batch_keys(config)) <= set(batch)
  for key, spec in abstract.items():
    assert batch[key].shape == spec.shape and batch[key].dtype == spec.dtype, key
  with jax.set_mesh(mesh):
    lowered = trainer.step.lower(trainer_lib.abstract_state(trainer), abstract)
  assert "keypoints" in lowered.out_info[1] and "l1" in lowered.out_info[1]


def test_kptllm_two_step_run_trains_and_checkpoints(tmp_path):
  config = _kpt_config(tmp_path / "data").unlock()
  config.data.tasks = "visual:1,textual:1"         # every row has a <keypoint> target
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  workdir = tmp_path / "work"
  state = trainer_lib.run(config, str(workdir), mesh=mesh)
  assert int(state.step) == 2
  rows = [r for r in metrics_writer.read_metrics(str(workdir)) if "l1" in r]
  assert [r["step"] for r in rows] == [1, 2]
  assert all(np.isfinite(r["loss"]) and r["keypoints"] > 0 for r in rows)
  assert (workdir / "checkpoints").is_dir() and (workdir / "adapter.safetensors").exists()
