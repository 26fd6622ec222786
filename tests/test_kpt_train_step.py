"""KptLLM's train step on the tiny model: only LoRA, the projector, the prompt modules and
the keypoint head change; L1 + LM loss; a few synthetic support/query pairs are over-fitted
(the L1 of the <keypoint> regression falls)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import tiny
from kptjax.data import kpt_tasks
from kptjax.data.tokenizer import load_tokenizer
from kptjax.keypoints import get_spec
from kptjax.models import kptllm
from kptjax.models.vlm import dummy_inputs
from kptjax.training import optim
from kptjax.training.kpt_step import l1_stats, make_kpt_train_step
from kptjax.training.step import init_state

PAIRS = 4


def _config():
  c = tiny.get_config("lora").unlock()
  c.model.kpt.enabled = True
  c.model.remat_policy = "none"
  c.data.coord_format, c.data.rounds, c.data.max_len = "keypoint_token", 1, 0
  c.optim.lr, c.optim.schedule, c.optim.warmup_ratio = 1e-2, "constant", 0.0
  c.optim.weight_decay = 0.0
  return c.lock()


def _blob(side, xy, rng):
  """A noisy image with a bright 6 px square centred at xy (normalized)."""
  img = rng.normal(0.0, 0.3, (side, side, 3)).astype(np.float32)
  cx, cy = (np.asarray(xy) * side).astype(int)
  img[max(cy - 3, 0):cy + 3, max(cx - 3, 0):cx + 3] = 2.0
  return img


def _pairs(config):
  """PAIRS support/query pairs of one keypoint (the 'nose' of coco17: a bright square)."""
  rng = np.random.default_rng(0)
  side = config.model.vit.image_size
  enc = kpt_tasks.TaskEncoder(load_tokenizer(""), config.data, 16,
                              prompt_token_id=config.model.kpt.prompt_token_id,
                              keypoint_token_id=config.model.kpt.keypoint_token_id,
                              image_token_id=config.model.image_token_id)
  spec = get_spec("coco17")
  rows = []
  for _ in range(PAIRS):
    q, s = rng.uniform(0.2, 0.8, 2), rng.uniform(0.2, 0.8, 2)
    kp = np.zeros((17, 3), np.float32)
    kp[0] = (q[0] * side, q[1] * side, 2)
    ex = enc.encode_task("visual", kp, side, spec, None)
    rows.append(dict(image=_blob(side, q, rng), support_image=_blob(side, s, rng)[None],
                     support_xy=s[None, None].astype(np.float32),
                     support_mask=np.ones((1, 1), np.float32),
                     **{k: ex[k] for k in ("tokens", "targets", "loss_mask", "input_mask",
                                           "kpt_xy", "kpt_mask")}))
  return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


def test_l1_stats_by_hand():
  out = l1_stats(jnp.array([[[0.1, 0.2], [0.5, 0.5]]]), jnp.array([[[0.3, 0.1], [0.0, 0.0]]]),
                 jnp.array([[1.0, 0.0]]))
  assert float(out["l1_sum"]) == pytest.approx(0.3) and float(out["keypoints"]) == 1.0


# Tiny graphs compile twice as fast without XLA's backend optimizations; values agree.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
STEPS = 40


@pytest.fixture(scope="module")
def run():
  """Init, one update (kept), then STEPS - 1 more on the same PAIRS pairs."""
  config = _config()
  batch = _pairs(config)
  model = kptllm.KptLLM(config.model)
  init = jax.jit(lambda key: model.init(key, *dummy_inputs(config.model),
                                        **kptllm.dummy_support(config.model)),
                 compiler_options=FAST_COMPILE)
  params = nn.meta.unbox(init(jax.random.key(0, impl="unsafe_rbg"))["params"])
  mask = optim.trainable_mask(params, config.optim.trainable)
  tx = optim.make_optimizer(config.optim, STEPS)
  step = jax.jit(make_kpt_train_step(
      model, tx, mask, lr_schedule=optim.schedule(config.optim, STEPS),
      rules=config.mesh.rules, l1_weight=config.optim.l1_weight), compiler_options=FAST_COMPILE)
  state, first = step(init_state(params, tx, mask), batch)
  after_one = jax.device_get(state.params)
  l1 = [float(first["l1"])]
  for _ in range(STEPS - 1):
    state, m = step(state, batch)
    l1.append(float(m["l1"]))
  return dict(batch=batch, params=params, mask=mask, after_one=after_one, first=first, l1=l1)


def test_one_update_changes_only_lora_projector_prompt_modules_and_head(run):
  assert run["batch"]["kpt_mask"].shape == (PAIRS, 1)
  before = traverse_util.flatten_dict(run["params"])
  after = traverse_util.flatten_dict(run["after_one"])
  trained = traverse_util.flatten_dict(run["mask"])
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  assert changed <= {k for k, m in trained.items() if m}     # frozen leaves: bit-identical
  for module in ("keypoint_head", "prompt_encoder", "prompt_extractor", "prompt_projector",
                 "projector"):
    assert any(k[0] == module for k in changed), module
  assert any(k[0] == "llm" and k[-1] == "lora_b" for k in changed)
  assert not any(k[0] in ("vit", "llm") and k[-1] not in ("lora_a", "lora_b") for k in changed)
  first = run["first"]
  assert float(first["loss"]) == pytest.approx(
      float(first["lm_loss"]) + 2.0 * float(first["l1"]), rel=1e-5)
  assert float(first["keypoints"]) == PAIRS


def test_overfits_support_query_pairs(run):
  l1 = run["l1"]
  assert np.mean(l1[-3:]) < 0.5 * l1[0], l1
