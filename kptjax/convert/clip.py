"""CLIP vision tower Hugging Face checkpoints -> kptjax ViT config + params.

Reads ``CLIPVisionModel`` directories (config.json ``model_type`` 'clip_vision_model',
tensors under ``vision_model.`` or, as transformers v5 saves them, unprefixed), full
``CLIPModel`` ones ('clip': the ``vision_config``; the text tower and projections are not
used) and llava-hf ``LlavaForConditionalGeneration`` ones ('llava' with a CLIP
``vision_config``: tensors under ``vision_tower.vision_model.`` or
``model.vision_tower.vision_model.``), e.g. LLaVA-1.5's ``clip-vit-large-patch14-336``.
Tensors stream one at a time into preallocated layer-stacked numpy arrays, in their stored
dtype unless ``param_dtype`` asks for another, as in ``kptjax.convert.dinov2``.
Tensors outside the vision tower are not read; inside it, one the ViT has no place for
(``ALLOWED_UNUSED`` excepted) is an error naming it.

The returned config has CLIP's flags (configs/common.py ``vit_config``): no patch bias, the
``pre_layrnorm`` as 'pre_norm', no LayerScale, ``final_layernorm=False`` (CLIP's
``post_layernorm`` only normalizes the pooled class token, which kptjax does not use; it is
not loaded), ``hidden_act`` from the checkpoint ('quick_gelu'). ``feature_layer`` is -1;
LLaVA's is -2 (``hidden_states[-2]``), which ``load_vlm`` takes from the experiment config.

    >>> vit_config, params = load_clip_vision("/ckpt/clip-vit-large-patch14-336")
    >>> vit_config.feature_layer = -2
    >>> feats = ViT(vit_config).apply({"params": params}, images)   # [B, 576, 1024]
"""

from __future__ import annotations

import pathlib
import re
from typing import Any

import ml_collections
import numpy as np

from kptjax.convert import hf_io
from kptjax.convert import vit_rules
from kptjax.convert.vit_rules import Rule, place_tensor, raise_if_dropped
from kptjax.convert.identify import identify
from kptjax.errors import CheckpointError
from kptjax.models.layers import to_dtype

MODEL_TYPES = ("clip_vision_model", "clip")
_PREFIXES = ("model.vision_tower.vision_model.", "vision_tower.vision_model.", "vision_model.")
# transformers v5's CLIPVisionModel.save_pretrained writes the names unprefixed.
_UNPREFIXED = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")
# Vision-tower tensors (names without the prefix) the ViT does not use, on purpose.
ALLOWED_UNUSED = ("embeddings.position_ids", "post_layernorm.weight", "post_layernorm.bias")


def vision_hf_config(hf_config: dict) -> dict:
  """The CLIPVisionConfig dict of a CLIPVisionModel / CLIPModel / LLaVA config.json."""
  model_type = hf_config.get("model_type", "clip_vision_model")
  if model_type == "clip_vision_model":
    return hf_config
  if model_type in ("clip", "llava"):
    vision = hf_config.get("vision_config")
    if not isinstance(vision, dict):
      raise CheckpointError(f"config.json: model_type={model_type!r} without a vision_config")
    vision_type = vision.get("model_type", "clip_vision_model")
    if vision_type != "clip_vision_model":
      raise CheckpointError(f"config.json: vision_config.model_type={vision_type!r} "
                            "(expected 'clip_vision_model')")
    return vision
  raise CheckpointError(f"config.json: model_type={model_type!r} (expected one of "
                        f"{MODEL_TYPES + ('llava',)})")


def vit_config_from_hf(hf_config: dict, image_size: int | None = None
                       ) -> ml_collections.ConfigDict:
  """ViT fields (configs/common.py ``vit_config``) from a CLIP config.json dict.

  Args:
    hf_config: the checkpoint's config.json (CLIPVisionConfig, or a CLIPConfig /
      LlavaConfig whose ``vision_config`` is one).
    image_size: input side in pixels; None = the checkpoint's own ``image_size``. The
      checkpoint's ``image_size`` becomes ``pretrained_image_size`` (the position grid).
  """
  v = vision_hf_config(hf_config)
  if int(v.get("num_channels", 3)) != 3:
    raise CheckpointError(f"config.json: num_channels={v['num_channels']} (expected 3)")
  pretrained = vit_rules.square_side(v.get("image_size", 224), "image_size")
  return ml_collections.ConfigDict(dict(
      image_size=int(image_size or pretrained),
      patch_size=vit_rules.square_side(v.get("patch_size", 32), "patch_size"),
      hidden_size=int(v.get("hidden_size", 768)),
      num_layers=int(v.get("num_hidden_layers", 12)),
      num_heads=int(v.get("num_attention_heads", 12)),
      intermediate_size=int(v.get("intermediate_size", 3072)),
      num_register_tokens=0,
      pretrained_image_size=pretrained,
      layerscale_value=1.0,
      layer_norm_eps=float(v.get("layer_norm_eps", 1e-5)),
      qkv_bias=True,
      use_swiglu_ffn=False,
      hidden_act=str(v.get("hidden_act", "quick_gelu")),
      feature_layer=-1,
      pos_embed="learned",
      interpolate_antialias=False,     # CLIP: F.interpolate(bicubic, align_corners=False)
      patch_bias=False,
      pre_layernorm=True,
      layerscale=False,
      final_layernorm=False,
  ))


# ------------------------------------------------------------------ tensor name table
_EMBED_RULES: dict[str, Rule] = {
    "embeddings.class_embedding": (("embeddings", "cls_token"), *vit_rules.same()),
    "embeddings.position_embedding.weight": (("embeddings", "pos_embed"), *vit_rules.same()),
    "embeddings.patch_embedding.weight": (
        ("embeddings", "patch_kernel"),
        lambda w: w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0]), vit_rules.conv_shape),
    "pre_layrnorm.weight": (("pre_norm", "scale"), *vit_rules.same()),
    "pre_layrnorm.bias": (("pre_norm", "bias"), *vit_rules.same()),
}


def _layer_rules() -> dict[str, Rule]:
  """Per-block rules keyed by the name after ``encoder.layers.{i}.``; paths under 'layers'."""
  rules: dict[str, Rule] = {}
  for hf, ours in (("layer_norm1", "norm1"), ("layer_norm2", "norm2")):
    rules[f"{hf}.weight"] = ((ours, "scale"), *vit_rules.same())
    rules[f"{hf}.bias"] = ((ours, "bias"), *vit_rules.same())
  projections = {
      "self_attn.q_proj": ("attention", "query"),
      "self_attn.k_proj": ("attention", "key"),
      "self_attn.v_proj": ("attention", "value"),
      "self_attn.out_proj": ("attention", "out"),
      "mlp.fc1": ("mlp", "fc1"),
      "mlp.fc2": ("mlp", "fc2"),
  }
  for name, path in projections.items():
    rules[f"{name}.weight"] = (path + ("kernel",), *vit_rules.linear())
    rules[f"{name}.bias"] = (path + ("bias",), *vit_rules.same())
  return rules


def load_clip_vision(ckpt_dir: str | pathlib.Path, *, param_dtype: Any = None,
                     image_size: int | None = None) -> tuple[ml_collections.ConfigDict, dict]:
  """Loads the vision tower of a CLIP (or llava-hf LLaVA) Hugging Face checkpoint directory.

  Args:
    ckpt_dir: directory with config.json and *.safetensors (single or sharded) or
      pytorch_model*.bin (needs torch).
    param_dtype: storage dtype of the returned params ('bfloat16', jnp.float32, ...);
      None keeps each tensor's stored dtype.
    image_size: input side in pixels for the returned config (None = the checkpoint's);
      the position embeddings are resized to it at apply time, as CLIP's
      ``interpolate_pos_encoding=True`` does.

  Returns:
    (vit config as ``config.model.vit``, params) where params is the nested dict of numpy
    arrays that ``ViT(config).apply({'params': params}, images)`` takes (no LoRA leaves).

  Raises:
    CheckpointError: unreadable dir, not a CLIP config, a tensor missing, or one of the
      wrong shape (the message names the tensor, the expected and the found shape).
  """
  ckpt_dir = pathlib.Path(ckpt_dir)
  hf = hf_io.read_config(ckpt_dir)
  identify(ckpt_dir, hf, "vit")
  config = vit_config_from_hf(hf, image_size)
  target_dtype = None if param_dtype is None else to_dtype(param_dtype)
  expected = vit_rules.flatten_paths(vit_rules.param_shapes(config))
  layer_rules = _layer_rules()
  num_layers = config.num_layers

  arrays: dict[tuple[str, ...], np.ndarray] = {}
  filled: dict[tuple[str, ...], set[int]] = {}
  skipped = []
  prefix = "vision_model."     # for messages: the one the dir's tensors use
  layer_re = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
  for raw_name, tensor in hf_io.iter_tensors(ckpt_dir):
    found = next((p for p in _PREFIXES if raw_name.startswith(p)),
                 "" if raw_name.startswith(_UNPREFIXED) else None)
    if found is None:   # text tower, projections, a LLaVA's language model / projector
      continue
    prefix, name = found, raw_name[len(found):]
    m = layer_re.fullmatch(name)
    layer, rule = (int(m.group(1)), layer_rules.get(m.group(2))) if m else (None, None)
    if m is None:
      rule = _EMBED_RULES.get(name)
    if rule is None or (layer is not None and layer >= num_layers):
      if name not in ALLOWED_UNUSED:
        skipped.append(raw_name)
      continue
    path, convert, hf_shape = rule
    path = ("layers",) + path if layer is not None else path
    place_tensor(arrays, filled, expected, path, layer, tensor, (convert, hf_shape),
                 target_dtype, f"{ckpt_dir}: tensor {raw_name!r}")
  raise_if_dropped(ckpt_dir, skipped)

  for path, shape in expected.items():
    if path[0] == "layers":
      missing = sorted(set(range(num_layers)) - filled.get(path, set()))
      if missing:
        hf_name = next(n for n, r in layer_rules.items() if r[0] == path[1:])
        raise CheckpointError(
            f"{ckpt_dir}: tensor '{prefix}encoder.layers.{missing[0]}.{hf_name}' "
            f"missing (expected for kptjax param {'/'.join(path)} of shape {shape[1:]}; "
            f"{len(missing)} of {num_layers} blocks lack it)")
    elif path not in arrays:
      name, rule = next((n, r) for n, r in _EMBED_RULES.items() if r[0] == path)
      raise CheckpointError(f"{ckpt_dir}: tensor '{prefix}{name}' missing (expected "
                            f"shape {rule[2](tuple(shape))})")
  return config, vit_rules.unflatten_paths(arrays)
