"""LoRA: a fresh adapter (B = 0) changes nothing; merging it into the kernels gives the
same outputs (<= 1e-5); trainable masks and parameter counts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from kptjax.errors import ConfigError
from kptjax.models import vlm
from kptjax.models.llama import Llama, LlamaConfig
from kptjax.models.lora import LoraDense, LoraSpec, count_params, merge_lora, trainable_mask

LLM = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8)
SPEC = LoraSpec(rank=4, alpha=8.0, dropout=0.1, targets=("q_proj", "v_proj", "down_proj"))


def random_params(module, *args, seed=0):
  """Params of module with N(0, 0.2^2) entries and lora_b = 0 (a fresh adapter), from
  jax.eval_shape: no init compile (LoraDense's own init is tested below)."""
  shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), *args)["params"])
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: np.zeros(s.shape, s.dtype) if path[-1].key == "lora_b"
      else rng.normal(0, 0.2, s.shape).astype(s.dtype), shapes)


def _randomize_lora_b(params, key):
  """Gives every lora_b leaf random values (a trained adapter)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(key, len(leaves))
  new = [0.3 * jax.random.normal(k, x.shape, x.dtype)
         if str(getattr(path[-1], "key", "")) == "lora_b" else x
         for (path, x), k in zip(leaves, keys)]
  return jax.tree_util.tree_unflatten(treedef, new)


def test_lora_dense_zero_b_and_merge():
  x = jax.random.normal(jax.random.key(0), (3, 5, 16))
  layer = LoraDense(24, use_bias=True, rank=4, alpha=8.0)
  params = nn.meta.unbox(layer.init(jax.random.key(1), x)["params"])
  assert params["lora_a"].shape == (16, 4) and params["lora_b"].shape == (4, 24)
  assert np.abs(params["lora_a"]).max() > 0 and np.all(params["lora_b"] == 0)
  base = {"kernel": params["kernel"], "bias": params["bias"]}
  y_base = LoraDense(24, use_bias=True).apply({"params": base}, x)
  np.testing.assert_array_equal(layer.apply({"params": params}, x), y_base)

  trained = _randomize_lora_b(params, jax.random.key(2))
  y = layer.apply({"params": trained}, x)
  assert np.abs(y - y_base).max() > 1e-2   # the adapter now matters
  merged = merge_lora(trained, 8.0 / 4)
  assert set(merged) == {"kernel", "bias"}
  np.testing.assert_allclose(LoraDense(24, use_bias=True).apply({"params": merged}, x), y,
                             atol=1e-5, rtol=0)


def test_lora_dropout_only_when_not_deterministic():
  x = jnp.ones((2, 8))
  layer = LoraDense(4, rank=2, alpha=2.0, dropout=0.5)
  params = _randomize_lora_b(nn.meta.unbox(layer.init(jax.random.key(0), x)["params"]),
                             jax.random.key(1))
  y_det = layer.apply({"params": params}, x)
  y_drop = layer.apply({"params": params}, x, deterministic=False,
                       rngs={"dropout": jax.random.key(2)})
  assert np.abs(y_det - y_drop).max() > 1e-3
  np.testing.assert_array_equal(layer.apply({"params": params}, x, deterministic=True), y_det)


def test_llama_lora_zero_b_unchanged_and_merged_equals_unmerged():
  """In the scanned layout (lora_a [L,in,r], lora_b [L,r,out])."""
  tokens = jax.random.randint(jax.random.key(0), (2, 10), 0, 64)
  with_lora = Llama(LLM, SPEC)
  without = Llama(LLM)
  params = random_params(with_lora, tokens)
  assert params["layers"]["self_attn"]["q_proj"]["lora_a"].shape == (2, 32, 4)
  base = merge_lora(params, SPEC.scale)    # B = 0: merging only drops the lora leaves
  fwd_lora = jax.jit(lambda p: with_lora.apply({"params": p}, tokens))
  fwd_base = jax.jit(lambda p: without.apply({"params": p}, tokens))
  np.testing.assert_array_equal(fwd_lora(params), fwd_base(base))

  trained = _randomize_lora_b(params, jax.random.key(2))
  unmerged = fwd_lora(trained)
  assert np.abs(unmerged - fwd_base(base)).max() > 1e-2
  np.testing.assert_allclose(fwd_base(merge_lora(trained, SPEC.scale)), unmerged,
                             atol=1e-5, rtol=0)


def test_trainable_mask_and_counts():
  config = tiny.get_config("lora")
  params = nn.meta.unbox(vlm.abstract_params(config.model))   # shapes only
  total = count_params(params)
  masks = {mode: trainable_mask(params, mode) for mode in ("all", "projector", "lora+projector")}
  assert count_params(params, masks["all"]) == total
  proj = count_params(params["projector"])
  assert count_params(params, masks["projector"]) == proj
  # LoRA leaves: r * (in + out) per target and layer.
  m, r = config.model, config.model.lora.rank
  d, kv = m.llm.hidden_size, m.llm.num_kv_heads * m.llm.head_dim
  llm_lora = m.llm.num_layers * r * ((d + d) + (d + kv))          # q_proj, v_proj
  vit_lora = m.vit.num_layers * r * 2 * (2 * m.vit.hidden_size)    # query, value
  assert count_params(params, masks["lora+projector"]) == proj + llm_lora + vit_lora
  flat = jax.tree_util.tree_leaves_with_path(masks["lora+projector"])
  assert all(v == (p[0].key == "projector" or p[-1].key in ("lora_a", "lora_b"))
             for p, v in flat)
  with pytest.raises(ConfigError, match="optim.trainable"):
    trainable_mask(params, "everything")
