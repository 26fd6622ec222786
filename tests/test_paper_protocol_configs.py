"""Every paper-protocol config (issue 17's rows) builds and lowers one train step at tiny
tower sizes: its own data / model / optim sections, the tiny config's towers and batch.
Lowering (no compile) catches a config whose fields the model, the factory or the step
cannot take."""

import jax
import pytest

from configs import (
    capellm_mp100,
    kptllm_mp100,
    locllm_coco,
    locllm_h36m,
    locllm_novel,
    locllm_stage1,
    tiny,
)
from kptjax import sharding
from kptjax.models import factory
from kptjax.training import trainer as trainer_lib

ROWS = [(locllm_coco, "clip"), (locllm_coco, "epochs=3"), (locllm_stage1, ""),
        (locllm_novel, ""), (locllm_h36m, ""), (capellm_mp100, ""), (capellm_mp100, "fixed"),
        (kptllm_mp100, "avg_pool"), (kptllm_mp100, "no_itd"),
        (kptllm_mp100, "prompts=visual+textual"), (kptllm_mp100, "held_out=vehicle")]


def _tiny_towers(config):
  """``config`` with the tiny config's tower numbers, dtypes, batch and length."""
  t = tiny.get_config()
  with config.unlocked():
    for tower in ("vit", "llm"):
      keep = {k: config.model[tower][k] for k in ("new_token_init",) if k in config.model[tower]}
      config.model[tower] = t.model[tower]
      config.model[tower].update(keep)
    config.model.update(dtype="float32", param_dtype="float32", image_token_id=4)
    config.model.kpt.update(prompt_token_id=103, keypoint_token_id=104)
    config.model.lora.update(rank=4, vit_targets=["query", "value"])
    config.train.update(batch_size=2, loss_chunk=0)
    config.data.update(max_len=64, rounds=min(config.data.rounds, 2), shots=1)
    config.mesh.shape.update(data=1, fsdp=1, tensor=1)
  return config


@pytest.mark.parametrize("module,arg", ROWS, ids=[f"{m.__name__.split('.')[-1]}:{a}"
                                                  for m, a in ROWS])
def test_config_lowers_one_train_step(module, arg):
  config = _tiny_towers(module.get_config(arg or None))
  mesh = jax.make_mesh((1, 1, 1), sharding.MESH_AXES, devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  trainer = trainer_lib.build(config, mesh)
  lowered = trainer.step.lower(trainer_lib.abstract_state(trainer),
                               factory.abstract_batch(config, mesh))
  assert "func" in lowered.as_text()[:2000]


def test_protocol_fields():
  assert locllm_novel.get_config().data.heldout_keypoints.split(",") == list(
      locllm_novel.HELD_OUT)
  assert locllm_novel.get_config().data.augment.flip_prob == 0.0
  assert locllm_coco.get_config("clip").model.vit.hidden_act == "quick_gelu"
  assert locllm_coco.get_config("clip").model.vit.image_size == 224
  s1 = locllm_stage1.get_config()
  assert (s1.train.stage, s1.optim.trainable, s1.data.train.source) == (1, "projector", "llava")
  k = kptllm_mp100.get_config("held_out=vehicle,no_itd,avg_pool,prompts=visual+textual")
  assert k.data.eval.split == "mp100_cross_vehicle_test" and not k.data.identify_then_detect
  assert k.model.kpt.prompt_extractor == "avg_pool" and "visual+textual:" in k.data.tasks
  cape = capellm_mp100.get_config()
  assert (cape.data.rounds_mode, cape.data.group_size) == ("dynamic", 0)
  assert cape.data.train.options == "descriptions=generated"
