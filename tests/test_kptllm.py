"""KptLLM's support inputs and regression head on the tiny config: shapes, the prompt
depends on where the support keypoint is, 5-shot masking, <keypoint> slot gathering,
logical axes on every param, and which params train."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from kptjax.models import kptllm, vlm
from kptjax.models.lora import trainable_mask

B, S, R = 2, 1, 3


@pytest.fixture(scope="module")
def config():
  c = tiny.get_config("lora").unlock()
  c.model.kpt.enabled = True
  c.model.remat_policy = "none"     # faster compiles; remat does not change values
  return c.lock()


@pytest.fixture(scope="module")
def params(config):
  # unsafe_rbg: the init compiles in half the time of threefry on a CPU.
  return kptllm.init_params(config.model, jax.random.key(0, impl="unsafe_rbg"))


def _support(config, xy, shots=S):
  side = config.model.vit.image_size
  img = jax.random.normal(jax.random.key(1), (B, shots, side, side, 3))
  xy = jnp.broadcast_to(jnp.asarray(xy, jnp.float32), (B, shots, xy.shape[-2], 2))
  return img, xy, jnp.ones(xy.shape[:-1], jnp.float32)


def test_prompt_encoder_and_extractor_shapes(config):
  e = config.model.vit.hidden_size
  enc = kptllm.PromptEncoder(e)
  xy = jnp.full((B, R, 2), 0.5)
  out, _ = jax.eval_shape(lambda: enc.init_with_output(jax.random.key(0), xy))
  assert out.shape == (B, R, e)
  ext = kptllm.PromptExtractor(2, config.model.vit.num_heads, 64)
  feats = jnp.ones((B, 16, e))
  z, v = jax.eval_shape(lambda: ext.init_with_output(jax.random.key(0), jnp.zeros(out.shape),
                                                     feats))
  assert z.shape == (B, R, e) and sorted(v["params"]) == ["layer_0", "layer_1", "norm"]
  assert kptllm.sincos_embed(xy, 8).shape == (B, R, 8)


def test_moving_the_support_keypoint_changes_the_prompt(config, params):
  """One keypoint: the prompt token (and the logits after it) follow its position."""
  model = kptllm.KptLLM(config.model)
  side, n = config.model.vit.image_size, 16
  k = config.model.kpt
  tokens = jnp.array([[1] + [4] * n + [7, k.prompt_token_id, 9, k.keypoint_token_id, 2]] * 2)
  img = jnp.broadcast_to(jax.random.normal(jax.random.key(1), (1, 1, side, side, 3)),
                         (2, 1, side, side, 3))
  xy = jnp.array([0.2, 0.7])[:, None, None, None] * jnp.ones((2, 1, 1, 2))  # row 0, row 1
  mask = jnp.ones((2, 1, 1))

  @jax.jit
  def run(params):
    prompt = model.apply({"params": params}, img, xy, mask, method="embed_prompts")
    logits, out = model.apply({"params": params}, jnp.zeros((2, side, side, 3)), tokens,
                              jnp.ones(tokens.shape, bool), support_images=img,
                              support_xy=xy, support_mask=mask)
    base = {name: params[name] for name in ("vit", "projector", "llm")}
    plain = vlm.VLM(config.model).apply({"params": base}, jnp.zeros((2, side, side, 3)),
                                        tokens, jnp.ones(tokens.shape, bool))
    return prompt, logits, out, plain
  prompt, logits, out, plain = run(params)
  # Before the prompt slot, KptLLM's logits (via Llama.hidden) are the VLM's.
  np.testing.assert_allclose(logits[:, :n + 2], plain[:, :n + 2], atol=1e-5)
  assert prompt.shape == (2, 1, config.model.llm.hidden_size)
  assert logits.shape == (2, tokens.shape[1], config.model.llm.vocab_size)
  assert out.shape == (2, 1, 2)
  assert float(jnp.max(jnp.abs(prompt[0] - prompt[1]))) > 1e-3
  np.testing.assert_allclose(logits[0, :n + 2], logits[1, :n + 2], atol=1e-5)  # causal
  assert float(jnp.max(jnp.abs(logits[0, n + 2:] - logits[1, n + 2:]))) > 1e-4
  assert float(jnp.max(jnp.abs(out[0] - out[1]))) > 0


def test_five_shot_prompt_averages_labeled_shots(config, params):
  model = kptllm.KptLLM(config.model)
  img, xy, mask = _support(config, np.full((R, 2), 0.3), shots=5)
  # Masks: all labeled; shots 1..4 unlabeled for keypoint 0 (its prompt is then shot
  # 0's alone); shots 1..4 unlabeled everywhere (a 1-shot prompt). One compile: vmap.
  masks = jnp.stack([mask, mask.at[:, 1:, 0].set(0.0), mask.at[:, 1:].set(0.0)])
  five, masked, one = jax.jit(jax.vmap(lambda m: model.apply(
      {"params": params}, img, xy, m, method="embed_prompts")))(masks)
  np.testing.assert_allclose(masked[:, 0], one[:, 0], atol=1e-5)
  assert five.shape == (B, R, config.model.llm.hidden_size)
  assert float(jnp.max(jnp.abs(five[:, 0] - one[:, 0]))) > 1e-5


def test_gather_slots_in_order():
  x = jnp.arange(2 * 6, dtype=jnp.float32).reshape(2, 6, 1)
  tokens = jnp.array([[5, 9, 5, 9, 9, 5], [9, 5, 5, 5, 5, 5]])
  out = kptllm.gather_slots(x, tokens, 9, 3)[..., 0]
  np.testing.assert_array_equal(out, [[1, 3, 4], [6, 6, 6]])   # row 1 has one slot (pos 0)


def test_every_param_has_logical_axes(config):
  boxed = kptllm.abstract_params(config.model)
  for name in ("prompt_encoder", "prompt_extractor", "prompt_projector", "keypoint_head"):
    leaves = jax.tree.leaves(boxed[name], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim
                          for x in leaves), name


def test_trained_params_are_lora_projector_prompt_modules_and_head(params):
  mask = trainable_mask(params, "lora+projector")
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): m
          for path, m in jax.tree_util.tree_leaves_with_path(mask)}
  trained = {p for p, m in flat.items() if m}
  assert all(p.split("/")[0] in ("projector", "prompt_encoder", "prompt_extractor",
                                 "prompt_projector", "keypoint_head")
             or p.endswith(("lora_a", "lora_b")) for p in trained)
  assert any(p.startswith("keypoint_head/") for p in trained)
  assert any(p.startswith("llm/") for p in trained) and any(p.startswith("vit/") for p in trained)
  assert not any(p.startswith(("llm/", "vit/")) and not p.endswith(("lora_a", "lora_b"))
                 for p in trained)


def test_avg_pool_prompt_is_the_gaussian_weighted_patch_mean(config):
  """prompt_extractor='avg_pool' (Table 6): no extractor params; the prompt is the
  projection of the support patches' Gaussian-weighted mean around the keypoint."""
  c = config.unlock()
  c.model.kpt.prompt_extractor = "avg_pool"
  c.model.kpt.avg_pool_sigma = 1.5
  c.lock()
  model = kptllm.KptLLM(c.model)
  params = kptllm.init_params(c.model, jax.random.key(0, impl="unsafe_rbg"))
  assert "prompt_extractor" not in params and "prompt_encoder" not in params
  assert "prompt_projector" in params
  img, xy, mask = _support(c, np.array([[0.1, 0.8], [0.55, 0.3], [0.9, 0.9]]))
  prompt = model.apply({"params": params}, img, xy, mask, method="embed_prompts")
  feats = np.asarray(model.apply({"params": params}, img[:, 0], method=lambda m, x: m.vit(x)),
                     np.float64)                                               # [B,P,E]
  g = int(round(feats.shape[1] ** 0.5))
  centres = (np.arange(g) + 0.5) / g
  cy, cx = np.meshgrid(centres, centres, indexing="ij")
  grid = np.stack([cx.ravel(), cy.ravel()], -1)
  d2 = ((np.asarray(xy[:, 0], np.float64)[:, :, None] - grid) ** 2).sum(-1)    # [B,R,P]
  w = np.exp(-d2 / (2 * (1.5 / g) ** 2))
  pooled = np.einsum("brp,bpe->bre", w / w.sum(-1, keepdims=True), feats)
  proj = params["prompt_projector"]
  want = pooled @ np.asarray(proj["kernel"], np.float64) + np.asarray(proj["bias"])
  np.testing.assert_allclose(np.asarray(prompt), want, rtol=2e-4, atol=2e-5)
  c.unlock().model.kpt.prompt_extractor = "mean"
  with pytest.raises(Exception, match="prompt_extractor"):
    kptllm.init_params(c.model, jax.random.key(0))
