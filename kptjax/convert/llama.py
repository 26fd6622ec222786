"""Hugging Face Llama-family checkpoint dir (Vicuna v1.5, Llama-2, Llama-3.x) -> kptjax.

``load_llama(dir)`` returns ``(config.model.llm ConfigDict, params)`` where params is the
``llm`` subtree of kptjax.models.llama.Llama (base weights only; LoRA leaves are added by
``kptjax.convert.load_vlm``) as numpy arrays in the stored dtype (bf16 stays bf16) or in
``param_dtype``. Tensors are read one at a time into preallocated arrays, so the model is
never held twice.

The dir is identified first (``identify``: config.json's ``model_type`` must be 'llama').
Every tensor of the checkpoint must have a place in the model: one the model would drop
(a q/k/v bias of a Qwen2 relabelled 'llama', an extra layer) is an error naming it;
only ``ALLOWED_UNUSED`` (the rotary ``inv_freq`` buffers old exports include, which
kptjax recomputes) is skipped.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np

from kptjax.convert import hf_io, vocab
from kptjax.convert.identify import identify
from kptjax.errors import CheckpointError
from kptjax.models import layers
from kptjax.models.llama import LlamaConfig

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)\.weight$")
# HF suffix inside a layer -> kptjax path inside a block, and whether it is a Linear
# (stored [out, in] by torch, [in, out] here).
_BLOCK_TENSORS = {
    "self_attn.q_proj": (("self_attn", "q_proj", "kernel"), True),
    "self_attn.k_proj": (("self_attn", "k_proj", "kernel"), True),
    "self_attn.v_proj": (("self_attn", "v_proj", "kernel"), True),
    "self_attn.o_proj": (("self_attn", "o_proj", "kernel"), True),
    "mlp.gate_proj": (("mlp", "gate_proj", "kernel"), True),
    "mlp.up_proj": (("mlp", "up_proj", "kernel"), True),
    "mlp.down_proj": (("mlp", "down_proj", "kernel"), True),
    "input_layernorm": (("input_layernorm", "scale"), False),
    "post_attention_layernorm": (("post_attention_layernorm", "scale"), False),
}
# Tensors a Llama checkpoint may hold that the model recomputes (name suffixes).
ALLOWED_UNUSED = ("rotary_emb.inv_freq",)
_DEFAULT_ROPE_SCALING = dict(rope_type="default", factor=1.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192)


def llm_config_from_hf(hf: dict, source: str = "config.json") -> ml_collections.ConfigDict:
  """config.json dict of a Llama checkpoint -> config.model.llm fields.

  Reads both the classic layout (``rope_theta`` + ``rope_scaling``) and transformers v5's
  ``rope_parameters``. Raises CheckpointError (messages start with ``source``) for
  variants this Llama does not implement and for missing required fields.
  """
  missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                         "num_hidden_layers", "num_attention_heads") if k not in hf]
  if missing:
    raise CheckpointError(f"{source}: fields {missing} missing (a Llama config.json has them)")
  if hf.get("hidden_act", "silu") != "silu":
    raise CheckpointError(f"{source}: hidden_act={hf['hidden_act']!r} (expected 'silu')")
  for flag in ("attention_bias", "mlp_bias"):
    if hf.get(flag):
      raise CheckpointError(f"{source}: {flag}=true is not supported (expected false)")
  rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
  rope_type = rope.pop("rope_type", rope.pop("type", "default"))
  if rope_type not in ("default", "llama3"):
    raise CheckpointError(f"{source}: rope type {rope_type!r} (expected default or llama3)")
  scaling = {"rope_type": rope_type}
  if rope_type == "llama3":
    for key in ("factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings"):
      if key not in rope:
        raise CheckpointError(f"{source}: llama3 rope scaling lacks {key!r}")
      scaling[key] = rope[key]
  num_heads = int(hf["num_attention_heads"])
  # The fields of configs/common.py llm_config (kept in sync; kptjax does not import configs/).
  return ml_collections.ConfigDict(dict(
      vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
      intermediate_size=int(hf["intermediate_size"]),
      num_layers=int(hf["num_hidden_layers"]), num_heads=num_heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
      head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // num_heads),
      rope_theta=theta,
      rope_scaling=dict(_DEFAULT_ROPE_SCALING, **scaling),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      max_position_embeddings=int(hf.get("max_position_embeddings", 2048))))


def llm_config_from_dir(ckpt_dir: str | pathlib.Path) -> ml_collections.ConfigDict:
  """config.model.llm fields of a Llama checkpoint dir, from its config.json only (the dir
  is identified first; errors name it)."""
  hf = hf_io.read_config(ckpt_dir)
  identify(ckpt_dir, hf, "llm")
  return llm_config_from_hf(hf, source=f"{ckpt_dir}/config.json")


def expected_shapes(llm_config: Any) -> dict[str, tuple[tuple[str, ...], int | None, bool,
                                                     tuple[int, ...]]]:
  """HF tensor name -> (kptjax path in the scanned layout, layer index or None,
  is_linear, HF shape)."""
  c = LlamaConfig.from_config(llm_config)
  d, f, h = c.hidden_size, c.intermediate_size, c.head_dim
  block_shapes = {
      "self_attn.q_proj": (c.num_heads * h, d), "self_attn.k_proj": (c.num_kv_heads * h, d),
      "self_attn.v_proj": (c.num_kv_heads * h, d), "self_attn.o_proj": (d, c.num_heads * h),
      "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f),
      "input_layernorm": (d,), "post_attention_layernorm": (d,),
  }
  out = {
      "model.embed_tokens.weight": (("embed_tokens", "embedding"), None, False,
                                    (c.base_vocab_size, d)),
      "model.norm.weight": (("norm", "scale"), None, False, (d,)),
  }
  if not c.tie_word_embeddings:
    out["lm_head.weight"] = (("lm_head", "kernel"), None, True, (c.base_vocab_size, d))
  for i in range(c.num_layers):
    for suffix, (path, is_linear) in _BLOCK_TENSORS.items():
      out[f"model.layers.{i}.{suffix}.weight"] = (("layers",) + path, i, is_linear,
                                                  block_shapes[suffix])
  return out


def _canonical(name: str) -> str:
  """Accepts LlamaModel names (no 'model.' prefix) as well as LlamaForCausalLM names."""
  if name.startswith(("model.", "lm_head.")):
    return name
  return "model." + name


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def unstack_layers(params: dict, num_layers: int) -> dict:
  """Scanned layout (``layers`` with a leading L axis) -> ``layers_0 .. layers_{L-1}``."""
  params = dict(params)
  stacked = params.pop("layers")
  for i in range(num_layers):
    params[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], stacked)
  return params


def _check_dropped(ckpt_dir: pathlib.Path, shapes: dict[str, tuple[int, ...]],
                   expected: dict) -> None:
  """Raises CheckpointError listing the tensors of ``shapes`` the model has no place for
  (``ALLOWED_UNUSED`` excepted)."""
  dropped = [f"{n} {tuple(s)}" for n, s in shapes.items()
             if _canonical(n) not in expected and not n.endswith(ALLOWED_UNUSED)]
  if dropped:
    raise CheckpointError(
        f"{ckpt_dir}: {len(dropped)} tensors have no place in the Llama its config.json "
        f"describes and would be dropped: {', '.join(dropped[:6])}"
        + (" ..." if len(dropped) > 6 else "") + " (a Llama-family checkpoint has none)")


def load_llama(ckpt_dir: str | pathlib.Path, *, param_dtype: Any = None,
               scan_layers: bool = True) -> tuple[ml_collections.ConfigDict, dict]:
  """Loads a Hugging Face Llama checkpoint dir.

  Args:
    ckpt_dir: dir with config.json and *.safetensors (single or sharded) or *.bin.
    param_dtype: storage dtype of the result ('bfloat16', 'float32', ...); None keeps the
      checkpoint's dtype.
    scan_layers: stacked layout (``layers`` [L, ...]) or ``layers_i``.

  Returns:
    (llm config ConfigDict, params dict of numpy arrays) — the ``llm`` subtree of the VLM.

  Raises:
    CheckpointError naming the tensor when one is missing or has the wrong shape.
  """
  ckpt_dir = pathlib.Path(ckpt_dir)
  config = llm_config_from_dir(ckpt_dir)
  c = LlamaConfig.from_config(config)
  expected = expected_shapes(config)
  dtype = None if param_dtype is None else layers.to_dtype(param_dtype)
  params: dict = {}
  arrays: dict[tuple[str, ...], np.ndarray] = {}
  seen: set[str] = set()
  # Names from the safetensors headers: a tensor the model would drop stops the load
  # before any data is read (a .bin checkpoint is checked while it streams).
  _check_dropped(ckpt_dir, hf_io.tensor_shapes(ckpt_dir) or {}, expected)
  for raw_name, tensor in hf_io.iter_tensors(ckpt_dir):
    name = _canonical(raw_name)
    if name not in expected:
      _check_dropped(ckpt_dir, {raw_name: tensor.shape}, expected)
      continue
    path, layer, is_linear, hf_shape = expected[name]
    if tuple(tensor.shape) != hf_shape:
      raise CheckpointError(f"{ckpt_dir}: tensor {raw_name!r} has shape {tuple(tensor.shape)}, "
                            f"expected {hf_shape}")
    value = tensor.T if is_linear else tensor
    if layer is None:
      arrays[path] = np.array(value, dtype=dtype or value.dtype)
    else:
      if path not in arrays:
        arrays[path] = np.empty((c.num_layers,) + value.shape, dtype=dtype or value.dtype)
      arrays[path][layer] = value
    seen.add(name)
    del tensor, value
  missing = [n for n in expected if n not in seen]
  if missing:
    n, (_, _, _, shape) = missing[0], expected[missing[0]]
    raise CheckpointError(f"{ckpt_dir}: tensor {n!r} (shape {shape}) is missing"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
  for path, value in arrays.items():
    _set(params, path, value)
  if not scan_layers:
    params = unstack_layers(params, c.num_layers)
  return config, params


def hf_tensors(params: dict, llm_config: Any) -> Iterator[tuple[str, np.ndarray]]:
  """The inverse of load_llama: yields (HF name, torch-layout numpy view) from a merged
  (no lora_*) llm param tree in either layout; added vocabulary rows (``new_tokens``)
  are appended to ``embed_tokens`` / ``lm_head``, so the export's vocab_size is the
  model's."""
  params = jax.tree_util.tree_map(np.asarray, params)
  added = {"model.embed_tokens.weight": (params["embed_tokens"].get("new_embedding"), 0),
           "lm_head.weight": (params.get("new_lm_head"), 1)}
  for name, (path, layer, is_linear, _) in expected_shapes(llm_config).items():
    if layer is not None and "layers" not in params:
      node = params[f"layers_{layer}"]
      path, layer = path[1:], None
    else:
      node = params
    for key in path:
      if key not in node:
        raise CheckpointError(f"params: {'/'.join(path)} missing (needed for {name})")
      node = node[key]
    value = node if layer is None else node[layer]
    if name in added:
      value = vocab.with_new_rows(value, *added[name])
    yield name, (value.T if is_linear else value)   # a view; writers copy one at a time
