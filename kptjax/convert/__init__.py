"""Hugging Face checkpoints <-> kptjax params.

Notebook API:

    >>> from kptjax import convert
    >>> llm_config, llm_params = convert.load_llama("/ckpt/vicuna-7b-v1.5", param_dtype="bfloat16")
    >>> vit_config, vit_params = convert.load_dinov2("/ckpt/dinov2-large", image_size=224)
    >>> vit_config, vit_params = convert.load_clip_vision("/ckpt/clip-vit-large-patch14-336")
    >>> model_config, params = convert.load_vlm(config)   # both towers + fresh LoRA/projector
    >>> convert.export_adapter(params, "adapter.safetensors")
    >>> convert.export_llama_hf(params, model_config.llm, "out/llama-merged",
    ...                         lora_scale=model_config.lora.alpha / model_config.lora.rank)

CLI: ``python -m kptjax.convert --llm_dir DIR --vit_dir DIR --out params.safetensors``.
"""

from __future__ import annotations

from typing import Any

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kptjax.convert.export import (adapter_params, apply_adapter, export_adapter,
                                   export_llama_hf, flatten, load_params, save_params,
                                   unflatten)
from kptjax.convert.hf_io import load_tensors, read_config
from kptjax.convert.identify import identify
from kptjax.convert import clip, dinov2, vocab
from kptjax.convert.llama import llm_config_from_dir, llm_config_from_hf, load_llama
from kptjax.errors import CheckpointError
from kptjax.models import vlm
from kptjax.models.lora import lora_a_init
from kptjax.models.projector import Projector

__all__ = [
    "load_llama", "llm_config_from_hf", "load_dinov2", "load_clip_vision", "load_vit",
    "load_vlm", "export_llama_hf",
    "export_adapter", "apply_adapter", "adapter_params", "save_params", "load_params",
    "read_config", "load_tensors", "CheckpointError", "identify", "model_config",
    "llm_config_from_dir", "vit_config_from_dir",
]

# Architecture fields a checkpoint decides (a config's values are replaced by the dir's).
_LLM_ARCH = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
             "num_kv_heads", "head_dim", "rope_theta", "rms_norm_eps", "tie_word_embeddings")


def load_dinov2(ckpt_dir, *, param_dtype=None, image_size=None):
  """See kptjax.convert.dinov2.load_dinov2."""
  return dinov2.load_dinov2(ckpt_dir, param_dtype=param_dtype, image_size=image_size)


def load_clip_vision(ckpt_dir, *, param_dtype=None, image_size=None):
  """See kptjax.convert.clip.load_clip_vision."""
  return clip.load_clip_vision(ckpt_dir, param_dtype=param_dtype, image_size=image_size)


_CLIP_TYPES = ("clip_vision_model", "clip", "llava")


def load_vit(ckpt_dir, *, param_dtype=None, image_size=None):
  """A vision tower dir by its config.json ``model_type`` (``identify``): 'clip_vision_model',
  'clip' or 'llava' (load_clip_vision), 'dinov2' or 'dinov2_with_registers' (load_dinov2)."""
  model_type = identify(ckpt_dir, read_config(ckpt_dir), "vit")
  load = load_clip_vision if model_type in _CLIP_TYPES else load_dinov2
  return load(ckpt_dir, param_dtype=param_dtype, image_size=image_size)


def vit_config_from_dir(ckpt_dir, *, image_size=None) -> ml_collections.ConfigDict:
  """config.model.vit fields of a DINOv2 or CLIP dir, from its config.json only."""
  hf = read_config(ckpt_dir)
  module = clip if identify(ckpt_dir, hf, "vit") in _CLIP_TYPES else dinov2
  return module.vit_config_from_hf(hf, image_size)


def _report_changes(section: str, old: ml_collections.ConfigDict, new: ml_collections.ConfigDict,
                    keys) -> None:
  for k in keys:
    if k in old and k in new and old[k] != new[k]:
      logging.warning("load_vlm: model.%s.%s=%s in the config, %s from the checkpoint "
                      "(and the tokens it adds); using the latter", section, k, old[k], new[k])


def _init_missing_leaf(name: str, shape: tuple[int, ...], dtype, key) -> jax.Array:
  leaf = name.rsplit("/", 1)[-1]
  if leaf == "lora_b":
    return jnp.zeros(shape, dtype)
  if leaf == "lora_a":
    if len(shape) == 2:
      return lora_a_init(key, shape, dtype)
    # Scanned layout [L, in, r]: each layer initialized on its own [in, r].
    keys = jax.random.split(key, int(np.prod(shape[:-2])))
    return jax.vmap(lambda k: lora_a_init(k, shape[-2:], dtype))(keys).reshape(shape)
  raise CheckpointError(f"load_vlm: param {name!r} {shape} is neither in a checkpoint nor "
                        "a LoRA leaf")


def model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The model section a run builds, from config.json files alone (no tensor is read).

  ``config.model`` with the architecture numbers of ``config.checkpoints.llm_dir`` /
  ``vit_dir`` (each dir identified first: ``identify``); differences from config.model
  are logged. Choices of the experiment (``vit.feature_layer``, a longer
  ``llm.max_position_embeddings``, the input ``vit.image_size``) stay the config's.

  Returns:
    A locked ConfigDict shaped like ``config.model``.
  """
  mc = ml_collections.ConfigDict(config.model.to_dict())
  llm_dir, vit_dir = config.checkpoints.llm_dir, config.checkpoints.vit_dir
  if llm_dir:
    llm_config = vocab.resize(llm_config_from_dir(llm_dir), config)
    _report_changes("llm", mc.llm, llm_config, _LLM_ARCH)
    llm_config.max_position_embeddings = max(llm_config.max_position_embeddings,
                                             mc.llm.max_position_embeddings)
    mc.llm = llm_config
  if vit_dir:
    vit_config = vit_config_from_dir(vit_dir, image_size=mc.vit.image_size)
    for k in ("feature_layer",):   # choices of the experiment, not of the checkpoint
      vit_config[k] = mc.vit[k]
    _report_changes("vit", mc.vit, vit_config,
                    ("hidden_size", "num_layers", "num_heads", "patch_size",
                     "num_register_tokens", "hidden_act", "patch_bias", "pre_layernorm",
                     "layerscale", "final_layernorm"))
    mc.vit = vit_config
  return mc.lock()


def load_vlm(config: ml_collections.ConfigDict, *, rng: jax.Array | None = None,
             param_dtype: Any = None) -> tuple[ml_collections.ConfigDict, dict]:
  """Builds VLM params from ``config.checkpoints.llm_dir`` / ``vit_dir``.

  The towers come from the checkpoints (their config.json decide the architecture numbers:
  ``model_config``, which identifies both dirs before any tensor is read; the ViT dir may
  be DINOv2 or CLIP, picked by its model_type), LoRA leaves are freshly initialized
  (B = 0), the projector randomly. An empty dir means that tower is randomly initialized.

  Args:
    config: a full kptjax config (uses config.model and config.checkpoints).
    rng: key for the fresh params (default: PRNGKey(config.seed)).
    param_dtype: storage dtype of the loaded towers (default config.model.param_dtype).

  Returns:
    (model config to build ``VLM`` with, params nested dict: 'vit', 'projector', 'llm').
  """
  mc = model_config(config)
  param_dtype = param_dtype or mc.param_dtype
  rng = jax.random.key(config.get("seed", 0)) if rng is None else rng
  loaded: dict = {}
  llm_dir, vit_dir = config.checkpoints.llm_dir, config.checkpoints.vit_dir
  if llm_dir:
    _, loaded["llm"] = load_llama(llm_dir, param_dtype=param_dtype, scan_layers=mc.scan_layers)
  if vit_dir:
    _, loaded["vit"] = load_vit(vit_dir, param_dtype=param_dtype, image_size=mc.vit.image_size)

  init_rng, proj_rng, lora_rng, rows_rng = jax.random.split(rng, 4)
  expected = flatten(nn.meta.unbox(vlm.abstract_params(mc)))
  from_ckpt = flatten(loaded)
  if llm_dir:   # rows of added tokens, from the checkpoint's (vocab.new_rows)
    from_ckpt.update({f"llm/{k}": v for k, v in
                      vocab.new_rows(loaded["llm"], mc.llm, rows_rng).items()})
  for name, value in from_ckpt.items():
    if name not in expected:
      raise CheckpointError(f"load_vlm: checkpoint param {name} has no place in the model")
    if tuple(value.shape) != tuple(expected[name].shape):
      raise CheckpointError(f"load_vlm: checkpoint param {name} has shape {value.shape}, "
                            f"the model expects {expected[name].shape}")
  if not (llm_dir and vit_dir):   # a tower without checkpoint: random init of everything
    fresh = flatten(vlm.init_params(mc, init_rng))
  else:
    fresh = flatten({"projector": nn.meta.unbox(Projector(mc.projector.kind, mc.llm.hidden_size).init(
        proj_rng, jnp.zeros((1, 1, mc.vit.hidden_size)))["params"])})
    keys = iter(jax.random.split(lora_rng, len(expected)))
    for name, leaf in expected.items():
      if name not in from_ckpt and name not in fresh:
        fresh[name] = _init_missing_leaf(name, leaf.shape, leaf.dtype, next(keys))
  flat = {name: from_ckpt[name] if name in from_ckpt else
          jnp.asarray(fresh[name], expected[name].dtype) for name in expected}
  return mc, unflatten(flat)
