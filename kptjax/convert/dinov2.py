"""DINOv2 Hugging Face checkpoints -> kptjax ViT config + params.

Reads ``Dinov2Model`` and ``Dinov2WithRegistersModel`` directories (also the backbone of
their ``*ForImageClassification`` heads: keys under ``dinov2.`` / ``dinov2_with_registers.``),
in either tensor naming: the hub's (``attention.attention.query``, ``attention.output.dense``,
fused SwiGLU ``mlp.weights_in``) or transformers v5's (``attention.q_proj``, ``o_proj``,
``mlp.gate_proj`` / ``up_proj``). Tensors stream one at a time into preallocated
layer-stacked numpy arrays, in their stored dtype (bf16 stays bf16) unless ``param_dtype``
asks for another. ``embeddings.mask_token`` (masked-image pretraining only) and the classifier
head of ``*ForImageClassification`` are not used (``ALLOWED_UNUSED``); any other tensor
the model has no place for (an extra block, an unknown name) is an error naming it.

    >>> vit_config, params = load_dinov2("/ckpt/dinov2-large", image_size=224)
    >>> feats = ViT(vit_config).apply({"params": params}, images)   # [B, 256, 1024]
"""

from __future__ import annotations

import pathlib
import re
from typing import Any

import ml_collections
import numpy as np

from kptjax.convert import hf_io, vit_rules
from kptjax.convert.identify import identify
from kptjax.errors import CheckpointError
from kptjax.models.layers import to_dtype

_PREFIXES = ("dinov2_with_registers.", "dinov2.")
# Tensors (names without the backbone prefix) the ViT does not use, on purpose.
ALLOWED_UNUSED = ("embeddings.mask_token", "classifier.weight", "classifier.bias")


def _swiglu_width(hidden_size: int, mlp_ratio: float) -> int:
  """Hidden width of DINOv2's SwiGLU FFN: 2/3 of the MLP width, rounded up to a multiple of 8."""
  return (int(int(hidden_size * mlp_ratio) * 2 / 3) + 7) // 8 * 8


def vit_config_from_hf(hf_config: dict, image_size: int | None = None
                       ) -> ml_collections.ConfigDict:
  """ViT fields (configs/common.py ``vit_config``) from a Dinov2(WithRegisters)Config dict.

  Args:
    hf_config: the checkpoint's config.json as a dict.
    image_size: input side in pixels; None = the checkpoint's own ``image_size``. The
      checkpoint's ``image_size`` becomes ``pretrained_image_size`` (the position grid).
  """
  model_type = hf_config.get("model_type", "dinov2")
  if model_type not in ("dinov2", "dinov2_with_registers"):
    raise CheckpointError(f"config.json: model_type={model_type!r} "
                          "(expected 'dinov2' or 'dinov2_with_registers')")
  if int(hf_config.get("num_channels", 3)) != 3:
    raise CheckpointError(f"config.json: num_channels={hf_config['num_channels']} (expected 3)")
  d = int(hf_config.get("hidden_size", 768))
  mlp_ratio = float(hf_config.get("mlp_ratio", 4))
  swiglu = bool(hf_config.get("use_swiglu_ffn", False))
  pretrained = vit_rules.square_side(hf_config.get("image_size", 224), "image_size")
  registers = int(hf_config.get("num_register_tokens", 0)) if model_type != "dinov2" else 0
  return ml_collections.ConfigDict(dict(
      image_size=int(image_size or pretrained),
      patch_size=vit_rules.square_side(hf_config.get("patch_size", 14), "patch_size"),
      hidden_size=d,
      num_layers=int(hf_config.get("num_hidden_layers", 12)),
      num_heads=int(hf_config.get("num_attention_heads", 12)),
      intermediate_size=_swiglu_width(d, mlp_ratio) if swiglu else int(d * mlp_ratio),
      num_register_tokens=registers,
      pretrained_image_size=pretrained,
      layerscale_value=float(hf_config.get("layerscale_value", 1.0)),
      layer_norm_eps=float(hf_config.get("layer_norm_eps", 1e-6)),
      qkv_bias=bool(hf_config.get("qkv_bias", True)),
      use_swiglu_ffn=swiglu,
      hidden_act=str(hf_config.get("hidden_act", "gelu")),
      feature_layer=-1,
      pos_embed="learned",
      interpolate_antialias=model_type == "dinov2_with_registers",
      patch_bias=True,
      pre_layernorm=False,
      layerscale=True,
      final_layernorm=True,
  ))


_EMBED_RULES: dict[str, list[vit_rules.Rule]] = {
    "embeddings.cls_token": [(("embeddings", "cls_token"), *vit_rules.squeeze_leading(2))],
    "embeddings.position_embeddings": [(("embeddings", "pos_embed"), *vit_rules.squeeze_leading(1))],
    "embeddings.register_tokens": [(("embeddings", "register_tokens"), *vit_rules.squeeze_leading(1))],
    "embeddings.patch_embeddings.projection.weight": [
        (("embeddings", "patch_kernel"),
         lambda w: w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0]), vit_rules.conv_shape)],
    "embeddings.patch_embeddings.projection.bias": [(("embeddings", "patch_bias"), *vit_rules.same())],
    "layernorm.weight": [(("norm", "scale"), *vit_rules.same())],
    "layernorm.bias": [(("norm", "bias"), *vit_rules.same())],
}


def _layer_rules(swiglu_width: int) -> dict[str, list[vit_rules.Rule]]:
  """Per-block rules keyed by the name after ``encoder.layer.{i}.``; paths under 'layers'."""
  rules: dict[str, list[vit_rules.Rule]] = {}
  for norm in ("norm1", "norm2"):
    rules[f"{norm}.weight"] = [((norm, "scale"), *vit_rules.same())]
    rules[f"{norm}.bias"] = [((norm, "bias"), *vit_rules.same())]
  for i in (1, 2):
    rules[f"layer_scale{i}.lambda1"] = [((f"layer_scale{i}",), *vit_rules.same())]
  projections = {
      ("attention", "query"): ("attention.attention.query", "attention.q_proj"),
      ("attention", "key"): ("attention.attention.key", "attention.k_proj"),
      ("attention", "value"): ("attention.attention.value", "attention.v_proj"),
      ("attention", "out"): ("attention.output.dense", "attention.o_proj"),
      ("mlp", "fc1"): ("mlp.fc1",),
      ("mlp", "fc2"): ("mlp.fc2",),
      ("mlp", "gate"): ("mlp.gate_proj",),
      ("mlp", "up"): ("mlp.up_proj",),
      ("mlp", "down"): ("mlp.down_proj", "mlp.weights_out"),
  }
  for path, names in projections.items():
    for name in names:
      rules[f"{name}.weight"] = [(path + ("kernel",), *vit_rules.linear())]
      rules[f"{name}.bias"] = [(path + ("bias",), *vit_rules.same())]
  f = swiglu_width
  # The hub's SwiGLU checkpoints fuse gate and up: weights_in = [gate; up] along the output.
  rules["mlp.weights_in.weight"] = [
      (("mlp", "gate", "kernel"), lambda w: w[:f].T, lambda s: (2 * s[1], s[0])),
      (("mlp", "up", "kernel"), lambda w: w[f:].T, lambda s: (2 * s[1], s[0]))]
  rules["mlp.weights_in.bias"] = [
      (("mlp", "gate", "bias"), lambda w: w[:f], lambda s: (2 * s[0],)),
      (("mlp", "up", "bias"), lambda w: w[f:], lambda s: (2 * s[0],))]
  return rules


def _hf_layer_name(path: tuple[str, ...], layer: int, rules: dict[str, list[vit_rules.Rule]]) -> str:
  """The HF names that feed param 'layers/<path>' of one block (for error messages)."""
  names = [f"encoder.layer.{layer}.{suffix}" for suffix, rs in rules.items()
           if any(r[0] == path for r in rs)]
  return " or ".join(repr(n) for n in names)


def load_dinov2(ckpt_dir: str | pathlib.Path, *, param_dtype: Any = None,
                image_size: int | None = None) -> tuple[ml_collections.ConfigDict, dict]:
  """Loads a DINOv2 (with or without registers) Hugging Face checkpoint directory.

  Args:
    ckpt_dir: directory with config.json and *.safetensors (single or sharded) or
      pytorch_model*.bin (needs torch).
    param_dtype: storage dtype of the returned params ('bfloat16', jnp.float32, ...);
      None keeps each tensor's stored dtype.
    image_size: input side in pixels for the returned config (None = the checkpoint's).

  Returns:
    (vit config as ``config.model.vit``, params) where params is the nested dict of numpy
    arrays that ``ViT(config).apply({'params': params}, images)`` takes (no LoRA leaves).

  Raises:
    CheckpointError: unreadable dir, a tensor missing, or one of the wrong shape (the
      message names the tensor, the expected and the found shape).
  """
  ckpt_dir = pathlib.Path(ckpt_dir)
  hf = hf_io.read_config(ckpt_dir)
  identify(ckpt_dir, hf, "vit")
  config = vit_config_from_hf(hf, image_size)
  target_dtype = None if param_dtype is None else to_dtype(param_dtype)
  expected = vit_rules.flatten_paths(vit_rules.param_shapes(config))
  layer_rules = _layer_rules(config.intermediate_size)
  num_layers = config.num_layers

  arrays: dict[tuple[str, ...], np.ndarray] = {}
  filled: dict[tuple[str, ...], set[int]] = {}
  skipped = []
  layer_re = re.compile(r"encoder\.layer\.(\d+)\.(.+)")
  for raw_name, tensor in hf_io.iter_tensors(ckpt_dir):
    name = raw_name
    for prefix in _PREFIXES:
      if name.startswith(prefix):
        name = name[len(prefix):]
        break
    m = layer_re.fullmatch(name)
    layer, rules = (int(m.group(1)), layer_rules.get(m.group(2))) if m else (None, None)
    if m is None:
      rules = _EMBED_RULES.get(name)
    if not rules or (layer is not None and layer >= num_layers):
      if name not in ALLOWED_UNUSED:
        skipped.append(raw_name)
      continue
    for path, convert, hf_shape in rules:
      path = ("layers",) + path if layer is not None else path
      if path not in expected:
        skipped.append(raw_name)   # e.g. fc1 in a SwiGLU model
        continue
      vit_rules.place_tensor(arrays, filled, expected, path, layer, tensor, (convert, hf_shape),
                   target_dtype, f"{ckpt_dir}: tensor {raw_name!r}")
  vit_rules.raise_if_dropped(ckpt_dir, skipped)

  for path, shape in expected.items():
    if path[0] == "layers":
      missing = sorted(set(range(num_layers)) - filled.get(path, set()))
      if missing:
        raise CheckpointError(
            f"{ckpt_dir}: tensor {_hf_layer_name(path[1:], missing[0], layer_rules)} missing "
            f"(expected for kptjax param {'/'.join(path)} of shape {shape[1:]}; "
            f"{len(missing)} of {num_layers} blocks lack it)")
    elif path not in arrays:
      names = [n for n, rs in _EMBED_RULES.items() if any(r[0] == path for r in rs)]
      raise CheckpointError(f"{ckpt_dir}: tensor {names[0]!r} missing (expected shape "
                            f"{_EMBED_RULES[names[0]][0][2](tuple(shape))})")
  return config, vit_rules.unflatten_paths(arrays)
