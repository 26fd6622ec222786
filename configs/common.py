"""Pieces shared by every config: the logical-axis rules and section defaults.

Each config module composes these; a field lives in exactly one section:
  model        architecture (vit, projector, llm, lora, dtypes, scan/remat)
  checkpoints  Hugging Face dirs to load, tokenizer dir, stage-1 checkpoint
  data         datasets, crop, augmentation, conversation format, sequence length
  optim        optimizer, schedule, trainable mask, gradient accumulation
  train        batch size, steps, logging / checkpoint / eval intervals
  mesh         mesh shape and the logical-axis -> mesh-axis rules
  decode       evaluation-time decoding options
"""

import ml_collections

# Logical axis name -> mesh axis (or None = replicated). One table for the whole project.
LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vit_embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("lora_rank", None),
    ("patch", None),
    ("length", None),
    ("cache_length", None),
)


def vit_config(*, image_size, patch_size, hidden_size, num_layers, num_heads,
               intermediate_size, num_register_tokens=0, pretrained_image_size=None):
  """DINOv2-style ViT fields (names follow transformers.Dinov2Config where they exist);
  CLIP's differences are the patch_bias / pre_layernorm / layerscale / final_layernorm
  flags and hidden_act='quick_gelu'."""
  return ml_collections.ConfigDict(dict(
      image_size=image_size,            # input crop side, pixels
      patch_size=patch_size,
      hidden_size=hidden_size,
      num_layers=num_layers,
      num_heads=num_heads,
      intermediate_size=intermediate_size,
      num_register_tokens=num_register_tokens,
      # Side of the image the position embeddings were trained at (DINOv2: 518);
      # None = image_size. Embeddings are interpolated bicubically to the input grid.
      pretrained_image_size=pretrained_image_size or image_size,
      layerscale_value=1.0,
      layer_norm_eps=1e-6,
      qkv_bias=True,
      use_swiglu_ffn=False,
      hidden_act="gelu",
      feature_layer=-1,                 # which block's output feeds the projector
      pos_embed="learned",              # 'learned' (DINOv2) | 'sincos2d' (fixed)
      # Resize the learned embeddings with torch's antialiased bicubic
      # (Dinov2WithRegistersModel) instead of plain bicubic (Dinov2Model).
      interpolate_antialias=False,
      # CLIP (kptjax/convert/clip.py) sets the next four to the opposite values.
      patch_bias=True,                  # bias on the patch-embedding conv
      pre_layernorm=False,              # LayerNorm on the embeddings (CLIP's pre_layrnorm)
      layerscale=True,                  # per-channel LayerScale (layer_scale1/2) in blocks
      final_layernorm=True,             # LayerNorm on the output tokens ('norm')
  ))


def llm_config(*, vocab_size, hidden_size, intermediate_size, num_layers, num_heads,
               num_kv_heads, head_dim=None, rope_theta=10000.0, rope_scaling=None,
               rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=2048):
  """Llama fields (names follow transformers.LlamaConfig)."""
  return ml_collections.ConfigDict(dict(
      vocab_size=vocab_size,
      hidden_size=hidden_size,
      intermediate_size=intermediate_size,
      num_layers=num_layers,
      num_heads=num_heads,
      num_kv_heads=num_kv_heads,
      head_dim=head_dim or hidden_size // num_heads,
      rope_theta=rope_theta,
      # rope_type 'default' (Llama-2, Vicuna) or 'llama3' (Llama-3.1) with its factors,
      # as in the checkpoint's config.json.
      rope_scaling={**dict(rope_type="default", factor=1.0, low_freq_factor=1.0,
                           high_freq_factor=4.0, original_max_position_embeddings=8192),
                    **(rope_scaling or {})},
      rms_norm_eps=rms_norm_eps,
      tie_word_embeddings=tie_word_embeddings,
      max_position_embeddings=max_position_embeddings,
  ))


def lora_config(rank=8, alpha=16.0, dropout=0.05, vit_targets=("query", "value"),
                llm_targets=("q_proj", "v_proj")):
  """LoRA on named projections of both towers. rank=0 turns LoRA off."""
  return ml_collections.ConfigDict(dict(
      rank=rank, alpha=alpha, dropout=dropout,
      vit_targets=list(vit_targets), llm_targets=list(llm_targets)))


def kpt_config(*, enabled=False, prompt_token_id, keypoint_token_id, extractor_layers=2):
  """KptLLM's support inputs and regression head (kptjax/models/kptllm.py).

  prompt_token_id: the placeholder a support keypoint's prompt token fills;
  keypoint_token_id: ``<keypoint>``, whose last hidden state the FFN head regresses to
  (x, y) (coord_format 'keypoint_token'). enabled: build ``KptLLM`` instead of ``VLM``.
  """
  return ml_collections.ConfigDict(dict(
      enabled=enabled, prompt_token_id=prompt_token_id, keypoint_token_id=keypoint_token_id,
      extractor_layers=extractor_layers))


def mesh_config(data=-1, fsdp=1, tensor=1):
  return ml_collections.ConfigDict(dict(
      shape=dict(data=data, fsdp=fsdp, tensor=tensor),
      rules=[list(r) if isinstance(r, tuple) else r for r in LOGICAL_AXIS_RULES],
  ))


def parse_arg(arg):
  """'tiny,res=112' -> {'tiny': True, 'res': '112'}."""
  out = {}
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    if "=" in part:
      k, v = part.split("=", 1)
      out[k.strip()] = v.strip()
    else:
      out[part] = True
  return out
