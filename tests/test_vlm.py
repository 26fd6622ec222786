"""The composite VLM against a torch reference assembled from the same HF modules:
Dinov2Model patch tokens -> torch projector -> LlamaForCausalLM(inputs_embeds=...), for
both projectors (<= 1e-4 in float32); the cached path and the attention output against
the teacher-forced forward.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from test_llama import make_hf_llama, randomize_

from configs import tiny
from kptjax import convert
from kptjax.models import vlm

TOL = 1e-4
IMAGE_ID = 5
N_IMG = 16            # (32 / 8)^2 patch tokens
VIT_WIDTH = 24        # differs from the LLM width (32) so the projector must map widths


def _torch_projector(kind: str) -> torch.nn.Module:
  if kind == "linear":
    proj = torch.nn.Linear(VIT_WIDTH, 32)
  else:
    proj = torch.nn.Sequential(torch.nn.Linear(VIT_WIDTH, 32), torch.nn.GELU(),
                               torch.nn.Linear(32, 32))
  randomize_(proj, seed=3)
  return proj.eval()


def _projector_params(proj: torch.nn.Module) -> dict:
  linears = [proj] if isinstance(proj, torch.nn.Linear) else [proj[0], proj[2]]
  return {f"fc{i + 1}": {"kernel": lin.weight.detach().numpy().T,
                         "bias": lin.bias.detach().numpy()} for i, lin in enumerate(linears)}


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
  """Tiny random HF towers on disk: (dinov2 model, llama model, vit_dir, llm_dir)."""
  vit_dir, llm_dir = tmp_path_factory.mktemp("dinov2"), tmp_path_factory.mktemp("llama")
  dino = transformers.Dinov2Model(transformers.Dinov2Config(
      hidden_size=VIT_WIDTH, num_hidden_layers=2, num_attention_heads=2,
      intermediate_size=48, image_size=56, patch_size=8)).eval()
  randomize_(dino, seed=1)
  dino.save_pretrained(vit_dir)
  llama = make_hf_llama(llm_dir, seed=2, num_key_value_heads=2)
  return dino, llama, vit_dir, llm_dir


def _config(kind: str, vit_dir, llm_dir) -> ml_collections.ConfigDict:
  c = tiny.get_config("mlp" if kind == "mlp2x_gelu" else None).unlock()
  c.checkpoints.vit_dir, c.checkpoints.llm_dir = str(vit_dir), str(llm_dir)
  c.model.image_token_id = IMAGE_ID
  return c.lock()


def _inputs():
  rng = np.random.RandomState(0)
  images = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  text = rng.randint(6, 64, (2, 7)).astype(np.int32)
  tokens = np.concatenate([np.ones((2, 1), np.int32), np.full((2, N_IMG), IMAGE_ID, np.int32),
                           text], axis=1)                           # <s> <im>*16 text*7
  mask = np.ones(tokens.shape, bool)
  mask[1, -3:] = False                                             # right padding
  return images, tokens, mask


def _torch_reference(dino, proj, llama, images, tokens, mask) -> np.ndarray:
  with torch.no_grad():
    feats = dino(pixel_values=torch.tensor(images.transpose(0, 3, 1, 2))).last_hidden_state
    image_tokens = proj(feats[:, 1:])                                # class token dropped
    tok = torch.tensor(tokens).long()
    embeds = llama.model.embed_tokens(tok)
    embeds[tok == IMAGE_ID] = image_tokens.reshape(-1, image_tokens.shape[-1])
    out = llama(inputs_embeds=embeds, attention_mask=torch.tensor(mask).long())
  return out.logits.numpy()


@pytest.fixture(scope="module")
def composites(towers):
  """{projector kind: (model config, params, torch reference logits)}."""
  dino, llama, vit_dir, llm_dir = towers
  out = {}
  for kind in ("linear", "mlp2x_gelu"):
    model_config, params = convert.load_vlm(_config(kind, vit_dir, llm_dir))
    assert model_config.vit.hidden_size == VIT_WIDTH and model_config.llm.num_kv_heads == 2
    proj = _torch_projector(kind)
    params["projector"] = _projector_params(proj)
    out[kind] = (model_config, params, _torch_reference(dino, proj, llama, *_inputs()))
  return out


@pytest.mark.parametrize("kind", ["linear", "mlp2x_gelu"])
def test_composite_matches_torch_reference(composites, kind):
  model_config, params, ref = composites[kind]
  assert model_config.projector.kind == kind
  images, tokens, mask = _inputs()
  model = vlm.VLM(model_config)
  logits = np.asarray(jax.jit(lambda p: model.apply({"params": p}, images, tokens, mask))(params))
  assert logits.shape == (2, tokens.shape[1], 64)
  np.testing.assert_allclose(logits[mask], ref[mask], atol=TOL, rtol=0)


def test_attention_output_and_cached_path_match_forward(composites):
  """return_attention leaves the logits unchanged and gives row-stochastic [L,B,H,T,T];
  prefill (extend with image embeds) + decode_step reproduce the teacher-forced logits."""
  model_config, params, ref = composites["linear"]
  images, tokens, mask = _inputs()
  model = vlm.VLM(model_config)
  full, attn = jax.jit(lambda p: model.apply({"params": p}, images, tokens, mask,
                                             return_attention=True))(params)
  full, attn = np.asarray(full), np.asarray(attn)
  np.testing.assert_allclose(full[mask], ref[mask], atol=TOL, rtol=0)
  t = tokens.shape[1]
  assert attn.shape == (2, 2, 4, t, t)
  np.testing.assert_allclose(attn.sum(-1), 1.0, atol=1e-5)
  assert np.all(np.triu(attn, k=1) == 0)                          # causal

  image_embeds = jax.jit(lambda p: model.apply({"params": p}, images, method="embed_image"))(params)
  assert image_embeds.shape == (2, N_IMG, 32) and image_embeds.dtype == jnp.float32
  cache = vlm.init_cache(model_config, batch=2, max_len=32)
  assert len(cache["k"]) == 2 and cache["k"][0].shape == (2, 2, 32, 8)   # L x [B,K,S,H]
  assert cache["end"].dtype == jnp.int32
  prompt_len = np.array([20, 18])                                 # <s> + 16 image + 3 / 1 text
  prompt = np.where(np.arange(20)[None] < prompt_len[:, None], tokens[:, :20], 0)
  prefill = jax.jit(lambda p, c: model.apply(
      {"params": p}, images, prompt, np.arange(20)[None] < prompt_len[:, None], c,
      method="prefill"))                                          # embed_image + extend
  logits, cache = prefill(params, cache)
  for b in range(2):
    np.testing.assert_allclose(np.asarray(logits)[b, :prompt_len[b]], full[b, :prompt_len[b]],
                               atol=TOL, rtol=0)
  step = jax.jit(lambda p, tok, c: model.apply({"params": p}, tok, c, method="decode_step"))
  for i in range(3):
    pos = prompt_len + i
    logits, cache = step(params, tokens[np.arange(2), pos], cache)
    np.testing.assert_allclose(np.asarray(logits), full[np.arange(2), pos], atol=TOL, rtol=0)
  np.testing.assert_array_equal(np.asarray(cache["end"]), prompt_len + 3)


def test_fan_in_init_rescales_tower_kernels_and_embeddings():
  import ml_collections

  from configs import tiny
  cfg = tiny.get_config("lora")
  model_config = ml_collections.ConfigDict(cfg.model.to_dict())
  hf = vlm.init_params(model_config, jax.random.key(0))
  model_config.init = "fan_in"
  scaled = vlm.init_params(model_config, jax.random.key(0))
  q = scaled["llm"]["layers"]["self_attn"]["q_proj"]
  d = model_config.llm.hidden_size
  np.testing.assert_allclose(q["kernel"], hf["llm"]["layers"]["self_attn"]["q_proj"]["kernel"]
                             * (d ** -0.5 / 0.02), rtol=1e-5)
  assert abs(float(np.std(scaled["llm"]["embed_tokens"]["embedding"])) - 1.0) < 0.05
  down = scaled["llm"]["layers"]["mlp"]["down_proj"]["kernel"]
  assert abs(float(np.std(down)) - model_config.llm.intermediate_size ** -0.5) < 0.2 * \
      model_config.llm.intermediate_size ** -0.5
  # LoRA factors and norms keep their draw.
  np.testing.assert_array_equal(q["lora_a"], hf["llm"]["layers"]["self_attn"]["q_proj"]["lora_a"])
  np.testing.assert_array_equal(scaled["llm"]["norm"]["scale"], hf["llm"]["norm"]["scale"])
  model_config.init = "xavier"
  with pytest.raises(Exception, match="model.init"):
    vlm.init_params(model_config, jax.random.key(0))
