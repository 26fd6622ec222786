"""Llama decoder against transformers' LlamaForCausalLM, and the KV cache against the full
forward.

Reference: a tiny random HF model saved with save_pretrained and converted with
kptjax.convert.load_llama. Weights are redrawn at a larger scale than HF's init (std 0.02
makes every logit ~0 and any comparison trivially pass). Bound: 1e-4 in float32.
"""

import jax
import numpy as np
import pytest
import torch
import transformers

from kptjax.convert.llama import load_llama, unstack_layers
from kptjax.models.llama import Llama, LlamaConfig, init_cache

TOL = 1e-4
VOCAB = 64

HF_CONFIGS = {
    # Llama-2 / Vicuna style: multi-head attention, default RoPE, untied output layer.
    "plain": dict(num_key_value_heads=4, tie_word_embeddings=False),
    # Llama-3.1 style: grouped-query attention, llama3 RoPE scaling (the short
    # original length puts the head_dim=8 frequencies in all three llama3 regimes).
    "gqa_llama3": dict(num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=True,
                       rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                         high_freq_factor=4.0,
                                         original_max_position_embeddings=16)),
}


def randomize_(module: torch.nn.Module, seed: int) -> None:
  """Redraws weights: matrices ~ N(0, 0.2^2), vectors (norms, biases) ~ 1 + N(0, 0.1^2)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      noise = torch.randn(p.shape, generator=gen)
      p.copy_(1 + 0.1 * noise if p.ndim == 1 else 0.2 * noise)


def make_hf_llama(out_dir, seed=0, dtype=torch.float32, **overrides):
  """A tiny random LlamaForCausalLM saved to out_dir; returns the torch model (eval)."""
  kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
            rms_norm_eps=1e-6)
  kw.update(overrides)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
  randomize_(model, seed)
  model.to(dtype).save_pretrained(out_dir)
  return model


def torch_logits(model, tokens, mask=None) -> np.ndarray:
  with torch.no_grad():
    out = model(torch.tensor(np.asarray(tokens)),
                attention_mask=None if mask is None else torch.tensor(np.asarray(mask)).long())
  return out.logits.float().numpy()


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def converted(request, tmp_path_factory):
  """(name, torch model, llm config, params) for each HF config."""
  path = tmp_path_factory.mktemp(request.param)
  model = make_hf_llama(path, **HF_CONFIGS[request.param])
  config, params = load_llama(path)
  return request.param, model, config, params


def _apply_fn(config, scan_layers=True):
  model = Llama(LlamaConfig.from_config(config), scan_layers=scan_layers)
  return model, jax.jit(lambda p, t, m: model.apply({"params": p}, t, m))


def test_logits_match_transformers(converted):
  name, hf_model, config, params = converted
  rng = np.random.RandomState(0)
  tokens = rng.randint(0, VOCAB, (2, 12)).astype(np.int32)
  mask = np.ones((2, 12), bool)
  mask[1, 9:] = False                      # right padding
  ref = torch_logits(hf_model, tokens, mask)
  _, apply = _apply_fn(config)
  out = np.asarray(apply(params, tokens, mask))
  assert out.dtype == np.float32 and out.shape == (2, 12, VOCAB)
  assert np.abs(ref).max() > 1.0, "reference logits too small for a meaningful check"
  np.testing.assert_allclose(out[mask], ref[mask], atol=TOL, rtol=0)
  if name == "plain":                      # the unscanned layout computes the same
    _, apply_unscanned = _apply_fn(config, scan_layers=False)
    out2 = np.asarray(apply_unscanned(unstack_layers(params, config.num_layers), tokens, mask))
    np.testing.assert_allclose(out2, out, atol=1e-6, rtol=0)


def test_cache_extend_and_decode_equal_full_forward(converted):
  """Prefill of right-padded prompts of different lengths, then one token per step: each
  step's logits equal the full forward's at that position."""
  _, _, config, params = converted
  model, apply = _apply_fn(config)
  rng = np.random.RandomState(1)
  seqs = rng.randint(0, VOCAB, (2, 12)).astype(np.int32)
  prompt_len = np.array([6, 3])
  full = np.asarray(apply(params, seqs, np.ones(seqs.shape, bool)))

  extend = jax.jit(lambda p, t, m, c: model.apply({"params": p}, t, m, c, method="extend"))
  prompt = np.where(np.arange(6)[None] < prompt_len[:, None], seqs[:, :6], 0)
  prompt_mask = np.arange(6)[None] < prompt_len[:, None]
  cache = init_cache(config, batch=2, max_len=16)
  logits, cache = extend(params, prompt, prompt_mask, cache)
  np.testing.assert_array_equal(np.asarray(cache["end"]), prompt_len)
  for b in range(2):
    n = prompt_len[b]
    np.testing.assert_allclose(np.asarray(logits)[b, :n], full[b, :n], atol=TOL, rtol=0)
  for step in range(5):
    pos = prompt_len + step
    token = seqs[np.arange(2), pos][:, None]
    logits, cache = extend(params, token, np.ones((2, 1), bool), cache)
    np.testing.assert_allclose(np.asarray(logits)[:, 0], full[np.arange(2), pos],
                               atol=TOL, rtol=0)
  np.testing.assert_array_equal(np.asarray(cache["end"]), prompt_len + 5)
  assert len(cache["k"]) == 2                                     # one buffer per layer
  assert cache["k"][0].shape == (2, config.num_kv_heads, 16, config.head_dim)
