"""KptLLM decoding: the cached path (prefill + steps) reads the same (x, y) at the
<keypoint> token as teacher forcing over the whole sequence, for right-padded rows of
different lengths with prompt slots; a row that never emits <keypoint> gets it forced."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from kptjax import kpt_decode
from kptjax.models import kptllm

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@pytest.fixture(scope="module")
def setup():
  c = tiny.get_config().unlock()
  c.model.kpt.enabled = True
  c.model.remat_policy = "none"
  config = c.lock()
  model = kptllm.KptLLM(config.model)
  params = kptllm.init_params(config.model, jax.random.key(0, impl="unsafe_rbg"))
  return config, model, params


def test_cached_keypoint_equals_teacher_forcing(setup):
  config, model, params = setup
  k, n, side = config.model.kpt, 16, config.model.vit.image_size
  p, kp = k.prompt_token_id, k.keypoint_token_id
  rows = [[1] + [4] * n + [7, p, 9, 11], [1] + [4] * n + [7, p, 9, 11, 12, 13]]
  t = max(map(len, rows))
  tokens = np.zeros((2, t), np.int32)
  mask = np.zeros((2, t), bool)
  for i, r in enumerate(rows):
    tokens[i, :len(r)], mask[i, :len(r)] = r, True
  images = jax.random.normal(jax.random.key(2), (2, side, side, 3))
  support = jax.random.normal(jax.random.key(3), (2, 1, side, side, 3))
  sxy, smask = jnp.array([[[[0.3, 0.6]]], [[[0.8, 0.1]]]]), jnp.ones((2, 1, 1))
  prompt = jax.jit(lambda prm: model.apply({"params": prm}, support, sxy, smask,
                                           method="embed_prompts"),
                   compiler_options=FAST_COMPILE)(params)
  xy, generated = kpt_decode.generate_keypoints(
      model, params, images, jnp.asarray(tokens), jnp.asarray(mask), prompt_embeds=prompt,
      max_new_tokens=1, eos_id=2)
  assert generated.tolist() == [[kp], [kp]]                  # forced at the last step
  # Teacher forcing over prompt + <keypoint> (row-wise, each at its own length).
  full = np.zeros((2, t + 1), np.int32)
  fmask = np.zeros((2, t + 1), bool)
  for i, r in enumerate(rows):
    full[i, :len(r) + 1], fmask[i, :len(r) + 1] = r + [kp], True
  _, ref = jax.jit(lambda prm: model.apply(
      {"params": prm}, images, jnp.asarray(full), jnp.asarray(fmask), support_images=support,
      support_xy=sxy, support_mask=smask, num_keypoint_slots=1),
      compiler_options=FAST_COMPILE)(params)
  np.testing.assert_allclose(xy, np.asarray(ref)[:, 0], atol=2e-5)
  assert np.all((xy > 0) & (xy < 1))
