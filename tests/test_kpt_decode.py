"""KptLLM decoding: the cached path (prefill + steps) reads the same (x, y) at the
<keypoint> token as teacher forcing over the whole sequence, for right-padded rows of
different lengths with prompt slots; a row that never emits <keypoint> gets it forced."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from kptjax.inference import kpt_decode
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


def test_shared_prefix_equals_rows_and_teacher_forcing(setup):
  """2 persons x 2 questions with prompt slots, 4 new tokens: the image header prefilled
  once per person (prefix_len) gives the per-row path's tokens and xy, and both match
  teacher forcing over prompt + generated tokens: every free token is the argmax of the
  full forward and xy is the head at the <keypoint> input token."""
  config, model, params = setup
  k, n, side = config.model.kpt, 16, config.model.vit.image_size
  slot, kp, eos, m = k.prompt_token_id, k.keypoint_token_id, 2, 4
  prefix = [1] + [4] * n + [7]
  queries = [[slot, 9, 11], [slot, 9, 11, 12, 13]]
  rows = [prefix + q for q in queries] * 2                    # person-major: p0q0 p0q1 ...
  t = max(map(len, rows))
  tokens, mask = np.zeros((4, t), np.int32), np.zeros((4, t), bool)
  for i, r in enumerate(rows):
    tokens[i, :len(r)], mask[i, :len(r)] = r, True
  images = jax.random.normal(jax.random.key(4), (2, side, side, 3))
  support = jax.random.normal(jax.random.key(5), (4, 1, side, side, 3))
  sxy = jax.random.uniform(jax.random.key(6), (4, 1, 1, 2))
  smask = jnp.ones((4, 1, 1))
  prompt = jax.jit(lambda prm: model.apply({"params": prm}, support, sxy, smask,
                                           method="embed_prompts"),
                   compiler_options=FAST_COMPILE)(params)
  row_images = jnp.repeat(images, 2, axis=0)
  xy_rows, gen_rows = kpt_decode.generate_keypoints(
      model, params, row_images, tokens, mask, prompt_embeds=prompt, max_new_tokens=m,
      eos_id=eos)
  xy, gen = kpt_decode.generate_keypoints(
      model, params, images, tokens, mask, prompt_embeds=prompt, max_new_tokens=m,
      eos_id=eos, prefix_len=len(prefix))
  np.testing.assert_array_equal(gen, gen_rows)
  np.testing.assert_allclose(xy, xy_rows, atol=2e-5)
  # Teacher forcing: each row + its answer up to and including the <keypoint>.
  answers = [list(g[:list(g).index(kp) + 1]) for g in gen]
  full = np.zeros((4, t + m), np.int32)
  fmask = np.zeros((4, t + m), bool)
  for i, (r, a) in enumerate(zip(rows, answers)):
    full[i, :len(r) + len(a)], fmask[i, :len(r) + len(a)] = r + a, True
  logits, ref = jax.jit(lambda prm: model.apply(
      {"params": prm}, row_images, jnp.asarray(full), jnp.asarray(fmask),
      support_images=support, support_xy=sxy, support_mask=smask, num_keypoint_slots=1),
      compiler_options=FAST_COMPILE)(params)
  logits = np.asarray(logits)
  free = 0
  for i, (r, a) in enumerate(zip(rows, answers)):
    for j, token in enumerate(a):
      forced = token == kp and (j == m - 1 or (j and a[j - 1] == eos))
      if not forced:
        assert np.argmax(logits[i, len(r) + j - 1]) == token, (i, j)
        free += 1
  assert free > 0
  np.testing.assert_allclose(xy, np.asarray(ref)[:, 0], atol=2e-5)
