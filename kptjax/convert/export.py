"""kptjax params -> files: a merged Llama in Hugging Face layout, the trained adapter
(LoRA + projector) as a small safetensors file, and whole param trees as safetensors.

Flat names join the param path with '/' (``llm/layers/self_attn/q_proj/lora_a``); the
scanned layout is kept as is (a leading 'layers' axis).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping

import jax
import numpy as np

from kptjax.convert import hf_io
from kptjax.convert.llama import hf_tensors
from kptjax.errors import CheckpointError, ConfigError
from kptjax.models.layers import to_dtype
from kptjax.models.llama import LlamaConfig
from kptjax.models.lora import LORA_LEAVES, merge_lora

ADAPTER_FORMAT = "kptjax-adapter-v1"
PARAMS_FORMAT = "kptjax-params-v1"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested dict -> {'a/b/c': leaf}."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten(value, name + "/"))
    else:
      out[name] = value
  return out


def unflatten(flat: Mapping[str, Any]) -> dict:
  """{'a/b/c': leaf} -> nested dict."""
  out: dict = {}
  for name, value in flat.items():
    node = out
    *parents, leaf = name.split("/")
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return out


def _has_lora(tree: Mapping[str, Any]) -> bool:
  return any(name.rsplit("/", 1)[-1] in LORA_LEAVES for name in flatten(tree))


def hf_llama_config(llm_config: Any, dtype: str = "float32") -> dict:
  """config.json contents of a LlamaForCausalLM with these numbers."""
  c = LlamaConfig.from_config(llm_config)
  scaling = c.rope_scaling_dict
  rope_scaling = None
  if scaling.get("rope_type", "default") == "llama3":
    rope_scaling = {k: scaling[k] for k in ("rope_type", "factor", "low_freq_factor",
                                            "high_freq_factor",
                                            "original_max_position_embeddings")}
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
      "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
      "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
      "head_dim": c.head_dim, "hidden_act": "silu",
      "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
      "rope_theta": c.rope_theta, "rope_scaling": rope_scaling,
      "tie_word_embeddings": c.tie_word_embeddings, "attention_bias": False,
      "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": dtype,
  }


def export_llama_hf(params: Mapping[str, Any], llm_config: Any, out_dir: str | pathlib.Path,
                    *, lora_scale: float | None = None, dtype: Any = None,
                    max_shard_bytes: int = 5 * 2**30) -> pathlib.Path:
  """Writes the LLM as a Hugging Face Llama dir (config.json + safetensors) that
  ``transformers.LlamaForCausalLM.from_pretrained`` loads.

  Args:
    params: the VLM param tree (its 'llm' subtree is used) or the llm subtree itself,
      scanned or unscanned layout.
    llm_config: config.model.llm (or a LlamaConfig).
    lora_scale: alpha / rank, required when the params hold LoRA leaves (they are merged).
    dtype: storage dtype of the written tensors (default: as stored in params).
    max_shard_bytes: larger models are split into shards with an index file.

  Returns:
    out_dir.
  """
  out_dir = pathlib.Path(out_dir)
  llm = params["llm"] if "llm" in params else params
  llm = jax.tree_util.tree_map(np.asarray, dict(llm))
  if _has_lora(llm):
    if lora_scale is None:
      raise ConfigError("export_llama_hf: params hold LoRA leaves; pass lora_scale="
                        "config.model.lora.alpha / config.model.lora.rank to merge them")
    llm = jax.tree_util.tree_map(np.asarray, merge_lora(llm, lora_scale))
  target = None if dtype is None else to_dtype(dtype)
  tensors = {name: (t if target is None else t.astype(target))
             for name, t in hf_tensors(llm, llm_config)}
  stored = np.dtype(next(iter(tensors.values())).dtype).name
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "config.json").write_text(json.dumps(hf_llama_config(llm_config, stored), indent=2))
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, t in tensors.items():
    if shards[-1] and size + t.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = t
    size += t.nbytes
  if len(shards) == 1:
    hf_io.write_safetensors(out_dir / "model.safetensors", shards[0], {"format": "pt"})
    return out_dir
  weight_map, total = {}, 0
  for i, shard in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    total += hf_io.write_safetensors(out_dir / fname, shard, {"format": "pt"})
    weight_map.update({name: fname for name in shard})
  (out_dir / "model.safetensors.index.json").write_text(json.dumps(
      {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
  return out_dir


def save_params(params: Mapping[str, Any], path: str | pathlib.Path,
                metadata: Mapping[str, str] | None = None) -> pathlib.Path:
  """Writes a (nested, unboxed) param tree as one safetensors file with '/'-joined names."""
  meta = {"format": PARAMS_FORMAT, **(metadata or {})}
  hf_io.write_safetensors(path, flatten(params), meta)
  return pathlib.Path(path)


def load_params(path: str | pathlib.Path) -> tuple[dict, dict[str, str]]:
  """Reads a file written by save_params / export_adapter: (nested params, metadata)."""
  flat, metadata = hf_io.read_safetensors(path)
  return unflatten(flat), metadata


def adapter_params(params: Mapping[str, Any]) -> dict:
  """The trained-adapter part of a VLM param tree: the 'projector' subtree and every
  lora_a / lora_b leaf, nested as in params."""
  keep = {name: leaf for name, leaf in flatten(params).items()
          if hasattr(leaf, "shape") and (name.split("/")[0] == "projector"
                                         or name.rsplit("/", 1)[-1] in LORA_LEAVES)}
  return unflatten(keep)


def export_adapter(params: Mapping[str, Any], path: str | pathlib.Path,
                   metadata: Mapping[str, str] | None = None) -> pathlib.Path:
  """Writes the LoRA + projector leaves of a VLM param tree as a safetensors file (a few
  MB for LocLLM instead of 14 GB). Read back with load_params, put back with
  apply_adapter."""
  adapter = adapter_params(params)
  if not adapter:
    raise CheckpointError("export_adapter: params have no 'projector' subtree and no LoRA leaves")
  return save_params(adapter, path, {"format": ADAPTER_FORMAT, **(metadata or {})})


def apply_adapter(params: Mapping[str, Any], adapter: Mapping[str, Any]) -> dict:
  """params with the adapter's leaves put in place. Every adapter leaf must exist in
  params with the same shape (else CheckpointError naming it)."""
  flat = flatten(params)
  for name, value in flatten(adapter).items():
    if name not in flat:
      raise CheckpointError(f"adapter tensor {name!r} has no place in the params")
    if tuple(flat[name].shape) != tuple(value.shape):
      raise CheckpointError(f"adapter tensor {name!r} has shape {tuple(value.shape)}, "
                            f"expected {tuple(flat[name].shape)}")
    flat[name] = value.astype(flat[name].dtype)
  return unflatten(flat)
