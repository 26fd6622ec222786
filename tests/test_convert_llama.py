"""Llama checkpoint conversion: export round trip through transformers, named errors for
missing / mis-shaped tensors, bf16 stays bf16, config.json layouts, adapter files, CLI."""

import json

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from absl import flags
from test_llama import VOCAB, make_hf_llama, torch_logits

from configs import tiny
from kptjax import convert
from kptjax.convert import hf_io
from kptjax.convert.llama import llm_config_from_hf
from kptjax.errors import CheckpointError, ConfigError
from kptjax.models import vlm
from kptjax.models.llama import Llama, LlamaConfig
from kptjax.models.lora import LoraSpec, merge_lora

GQA = dict(num_key_value_heads=2, rope_theta=500000.0,
           rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=16))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("llama")
  make_hf_llama(path, seed=5, **GQA)
  return path


def _tokens():
  return np.random.RandomState(3).randint(0, VOCAB, (2, 10)).astype(np.int32)


def test_export_merged_lora_llama_reloads_in_transformers(hf_dir, tmp_path):
  """Base weights + a trained (random) LoRA on q/v, merged and written in HF layout in
  several shards: transformers' logits equal kptjax's unmerged LoRA logits, and
  load_llama reads the exported dir back to the merged weights exactly."""
  config, base = convert.load_llama(hf_dir)
  spec = LoraSpec(rank=2, alpha=4.0, targets=("q_proj", "v_proj"))
  rng = np.random.RandomState(0)
  params = jax.tree_util.tree_map(lambda x: x, base)
  for name in spec.targets:
    layer = params["layers"]["self_attn"][name]
    d_in, d_out = layer["kernel"].shape[1:]
    layer["lora_a"] = rng.normal(0, 0.3, (2, d_in, 2)).astype(np.float32)
    layer["lora_b"] = rng.normal(0, 0.3, (2, 2, d_out)).astype(np.float32)
  tokens = _tokens()
  ours = Llama(LlamaConfig.from_config(config), spec).apply({"params": params}, tokens)

  with pytest.raises(ConfigError, match="lora_scale"):
    convert.export_llama_hf(params, config, tmp_path / "no_scale")
  out = convert.export_llama_hf({"llm": params}, config, tmp_path / "hf",
                                lora_scale=spec.scale, max_shard_bytes=20_000)
  assert (out / "model.safetensors.index.json").exists()
  reloaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
  np.testing.assert_allclose(torch_logits(reloaded, tokens), np.asarray(ours), atol=1e-4, rtol=0)

  config2, merged = convert.load_llama(out)
  assert config2.to_dict() == config.to_dict()
  expected = convert.flatten(merge_lora(params, spec.scale))
  for name, value in convert.flatten(merged).items():
    np.testing.assert_allclose(value, expected[name], atol=1e-7, rtol=0, err_msg=name)


def _rewrite(src, dst, edit):
  """Copies an HF dir with its tensors passed through edit(dict) -> dict."""
  dst.mkdir()
  (dst / "config.json").write_text((src / "config.json").read_text())
  hf_io.write_safetensors(dst / "model.safetensors", edit(hf_io.load_tensors(src)))


def test_missing_tensor_is_named(hf_dir, tmp_path):
  name = "model.layers.1.mlp.up_proj.weight"
  _rewrite(hf_dir, tmp_path / "ck", lambda t: {k: v for k, v in t.items() if k != name})
  with pytest.raises(CheckpointError, match=rf"{name}.*\(shape \(48, 32\)\) is missing"):
    convert.load_llama(tmp_path / "ck")


def test_wrong_shape_is_named_with_both_shapes(hf_dir, tmp_path):
  name = "model.layers.0.self_attn.k_proj.weight"
  _rewrite(hf_dir, tmp_path / "ck", lambda t: {**t, name: np.zeros((8, 32), np.float32)})
  with pytest.raises(CheckpointError,
                     match=rf"'{name}' has shape \(8, 32\), expected \(16, 32\)"):
    convert.load_llama(tmp_path / "ck")


def test_bf16_checkpoint_loads_as_bf16(tmp_path):
  """From .safetensors (parsed directly: safetensors' numpy backend has no bf16) and from a
  torch pytorch_model.bin."""
  model = make_hf_llama(tmp_path / "st", seed=1, dtype=torch.bfloat16)
  _, params = convert.load_llama(tmp_path / "st")
  assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {np.dtype(ml_dtypes.bfloat16)}
  torch_q = model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()
  np.testing.assert_array_equal(params["layers"]["self_attn"]["q_proj"]["kernel"][1]
                                .astype(np.float32), torch_q.T)
  _, params32 = convert.load_llama(tmp_path / "st", param_dtype="float32")
  assert {x.dtype for x in jax.tree_util.tree_leaves(params32)} == {np.dtype(np.float32)}

  (tmp_path / "bin").mkdir()
  (tmp_path / "bin" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
  torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
  _, from_bin = convert.load_llama(tmp_path / "bin")
  for name, value in convert.flatten(params).items():
    assert convert.flatten(from_bin)[name].dtype == value.dtype
    np.testing.assert_array_equal(convert.flatten(from_bin)[name], value, err_msg=name)


def test_llm_config_from_classic_and_v5_config_json():
  """Llama-3.1's config.json (rope_theta + rope_scaling) and transformers v5's
  (rope_parameters) give the same config."""
  classic = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
                 rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                   high_freq_factor=4.0, original_max_position_embeddings=8192),
                 hidden_act="silu", tie_word_embeddings=False)
  v5 = transformers.LlamaConfig(**classic).to_dict()
  assert "rope_parameters" in v5
  a, b = llm_config_from_hf(classic), llm_config_from_hf(v5)
  assert a.to_dict() == b.to_dict()
  assert a.head_dim == 128 and a.num_kv_heads == 8 and a.rope_scaling.factor == 8.0
  with pytest.raises(CheckpointError, match="rope type 'linear'"):
    llm_config_from_hf({**classic, "rope_scaling": dict(type="linear", factor=2.0)})


def test_adapter_export_and_apply(tmp_path):
  config = tiny.get_config("lora")
  rng = np.random.RandomState(0)
  params = jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(s.dtype),
                                  nn.meta.unbox(vlm.abstract_params(config.model)))
  path = convert.export_adapter(params, tmp_path / "adapter.safetensors")
  adapter, metadata = convert.load_params(path)
  assert metadata["format"] == convert.export.ADAPTER_FORMAT
  names = convert.flatten(adapter)
  assert all(n.startswith("projector/") or n.endswith(("lora_a", "lora_b")) for n in names)
  assert any(n.startswith("vit/") for n in names) and any(n.startswith("llm/") for n in names)
  zeroed = jax.tree_util.tree_map(np.zeros_like, params)
  restored = convert.flatten(convert.apply_adapter(zeroed, adapter))
  for name, value in convert.flatten(params).items():
    want = value if name in names else 0 * value
    np.testing.assert_array_equal(restored[name], want, err_msg=name)
  bad = {**names, "llm/embed_tokens/lora_a": np.zeros(3)}
  with pytest.raises(CheckpointError, match="llm/embed_tokens/lora_a"):
    convert.apply_adapter(params, convert.unflatten(bad))


def test_cli_writes_a_params_file(hf_dir, tmp_path):
  from kptjax.convert import __main__ as cli  # pylint: disable=g-import-not-at-top
  out = tmp_path / "towers.safetensors"
  flags.FLAGS(["convert", f"--llm_dir={hf_dir}", f"--out={out}"])
  try:
    cli.main([])
  finally:
    flags.FLAGS.unparse_flags()
  params, metadata = convert.load_params(out)
  config, expected = convert.load_llama(hf_dir)
  assert json.loads(metadata["llm_config"]) == config.to_dict()
  for name, value in convert.flatten(expected).items():
    np.testing.assert_array_equal(convert.flatten(params)["llm/" + name], value)
