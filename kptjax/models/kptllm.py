"""KptLLM (NeurIPS 2024, ``../shared/papers/003_*.txt`` Sec. 3): support inputs and
regression-token decoding on top of the VLM.

    support image ──ViT (the same one)──▶ F_s [B*S,P,Dv] ─────────────┐
    support keypoint x ∈ [0,1]^2 ──sin-cos PE──▶ MLP ──▶ F_p [B*S,R,Dv] ─▶ 2 cross-attention
                                                   layers (F_p queries F_s) ─▶ mean over the
                                                   S shots ─▶ Linear ─▶ prompt tokens z_p [B,R,D]
    query image ──ViT──▶ projector ──▶ image tokens z_q ──┐
    tokens with N image slots, R ``<prompt>`` slots ──────┴─▶ Llama ─▶ logits, and at every
        ``<keypoint>`` input position the last hidden state ─▶ FFN head ─▶ (x, y) in [0,1]

Axis letters: B batch, S shots, R prompt / keypoint slots per row, P support patches,
D LLM width, E ViT width, N heads, H head dim, F mlp width.

Param tree: the VLM's ``{vit, projector, llm}`` plus ``prompt_encoder``,
``prompt_extractor``, ``prompt_projector`` and ``keypoint_head`` (trained in every mode
that trains the projector: ``kptjax.models.lora.TRAINED_MODULES``). Config:
``config.model.kpt`` (prompt_token_id, keypoint_token_id, extractor_layers,
``prompt_extractor``: 'cross_attention' (the paper's) | 'avg_pool' (its Table 6 baseline:
``avg_pool_prompts``, no extractor params; ``avg_pool_sigma`` in patches, default 1)).

    >>> model = KptLLM(config.model)
    >>> logits, xy = model.apply({'params': p}, images, tokens, input_mask,
    ...                          support_images=s_img, support_xy=s_xy, support_mask=s_m)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kptjax.errors import ConfigError
from kptjax.models import layers
from kptjax.models.layers import DType, default_kernel_init, logical_init
from kptjax.models.vlm import VLM, dummy_inputs, fill_image_tokens

Array = jax.Array


def sincos_embed(xy: Array, dim: int, temperature: float = 10000.0) -> Array:
  """Sine-cosine embedding of points: xy f32[..., 2] in [0, 1] -> f32[..., dim].

  Each coordinate takes dim / 2 channels: sin and cos of 2*pi*x / temperature^(i / (dim/4)),
  i < dim / 4 (DETR / SAM style). dim must be a multiple of 4.
  """
  if dim % 4:
    raise ValueError(f"sincos_embed: dim={dim} is not a multiple of 4")
  q = dim // 4
  freqs = temperature ** (-np.arange(q, dtype=np.float32) / q)
  angles = 2 * np.pi * xy.astype(jnp.float32)[..., None] * freqs       # [..., 2, q]
  emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # [..., 2, 2q]
  return emb.reshape(*xy.shape[:-1], dim)


def _layer_norm(name: str) -> nn.LayerNorm:
  return nn.LayerNorm(dtype=jnp.float32, name=name,
                      scale_init=logical_init(nn.initializers.ones, ("vit_embed",)),
                      bias_init=logical_init(nn.initializers.zeros, ("vit_embed",)))


def _dense(features: int, axes: tuple[Any, Any], name: str | None, dtype: DType,
           param_dtype: DType = jnp.float32, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=logical_init(default_kernel_init, axes),
                  bias_init=logical_init(nn.initializers.zeros, (axes[1],)), name=name)


class PromptEncoder(nn.Module):
  """F_p = MLP(PE(x)): support keypoints f32[..., 2] (normalized crop units) -> [..., E]."""
  width: int
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, xy: Array) -> Array:
    h = sincos_embed(xy, self.width).astype(self.dtype)
    h = nn.gelu(_dense(self.width, (None, "mlp"), "fc1", self.dtype)(h), approximate=False)
    return _dense(self.width, ("mlp", "vit_embed"), "fc2", self.dtype)(h)


class CrossAttentionLayer(nn.Module):
  """Pre-norm: q += attn(norm(q), norm(kv)); q += mlp(norm(q)). q [B,R,E], kv [B,P,E]."""
  num_heads: int
  mlp_width: int
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, q: Array, kv: Array) -> Array:
    b, r, e = q.shape
    n = self.num_heads
    h = e // n

    def proj(x, name):
      w = self.param(name, logical_init(default_kernel_init, ("vit_embed", "heads", "head_dim")),
                     (e, n, h), jnp.float32)
      return jnp.einsum("BTE,ENH->BTNH", x.astype(self.dtype), w.astype(self.dtype))

    x = _layer_norm("norm_q")(q)
    m = _layer_norm("norm_kv")(kv)
    out, _ = layers.attention(proj(x, "query"), proj(m, "key"), proj(m, "value"))
    wo = self.param("out", logical_init(default_kernel_init, ("heads", "head_dim", "vit_embed")),
                    (n, h, e), jnp.float32)
    q = q + jnp.einsum("BTNH,NHE->BTE", out, wo.astype(self.dtype)).astype(q.dtype)
    x = _layer_norm("norm_mlp")(q)
    x = nn.gelu(_dense(self.mlp_width, ("vit_embed", "mlp"), "fc1", self.dtype)(x),
                approximate=False)
    return q + _dense(e, ("mlp", "vit_embed"), "fc2", self.dtype)(x).astype(q.dtype)


class PromptExtractor(nn.Module):
  """z_p = CrossAttnLayers(F_p, F_s): prompt queries [B,R,E] over support features [B,P,E]."""
  num_layers: int
  num_heads: int
  mlp_width: int
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, prompts: Array, feats: Array) -> Array:
    for i in range(self.num_layers):
      prompts = CrossAttentionLayer(self.num_heads, self.mlp_width, self.dtype,
                                    name=f"layer_{i}")(prompts, feats)
    return _layer_norm("norm")(prompts)


class KeypointHead(nn.Module):
  """y = FFN(u_kpt): hidden states [..., D] -> (x, y) f32[..., 2] in [0, 1] (sigmoid)."""
  width: int
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, u: Array) -> Array:
    h = nn.gelu(_dense(self.width, ("embed", "mlp"), "fc1", self.dtype)(u), approximate=False)
    return jax.nn.sigmoid(_dense(2, ("mlp", None), "fc2", self.dtype)(h).astype(jnp.float32))


PROMPT_EXTRACTORS = ("cross_attention", "avg_pool")


def avg_pool_prompts(feats: Array, xy: Array, sigma: float) -> Array:
  """The average-pooling prompt of KptLLM's Table 6 (POMNet's, the paper's [21]).

  Support patch features weighted by a Gaussian around each support keypoint:
  feats [B,P,E] on a g x g patch grid (row-major, P = g*g), xy f32[B,R,2] (normalized
  crop units, (x, y)), sigma in patches -> [B,R,E] with weights
  softmax_p(-|c_p - xy|^2 / (2 (sigma/g)^2)) over the patch centres c_p.
  """
  p = feats.shape[1]
  g = int(round(p ** 0.5))
  if g * g != p:
    raise ValueError(f"avg_pool_prompts: {p} patch features are not a square grid")
  centres = (jnp.arange(g, dtype=jnp.float32) + 0.5) / g
  cy, cx = jnp.meshgrid(centres, centres, indexing="ij")
  grid = jnp.stack([cx.ravel(), cy.ravel()], axis=-1)                      # [P,2]
  d2 = jnp.sum((xy.astype(jnp.float32)[:, :, None, :] - grid) ** 2, axis=-1)  # [B,R,P]
  w = jax.nn.softmax(-d2 / (2.0 * (sigma / g) ** 2), axis=-1)
  return jnp.einsum("BRP,BPE->BRE", w, feats.astype(jnp.float32)).astype(feats.dtype)


def gather_slots(x: Array, tokens: Array, token_id: int, num_slots: int) -> Array:
  """The rows of x [B,T,D] at the first num_slots positions where tokens == token_id,
  in order: [B,R,D] (slots a row does not have repeat its position 0; mask them out)."""
  is_slot = tokens == token_id
  # Stable order of slot positions first: argsort of (not slot, position).
  order = jnp.argsort(jnp.where(is_slot, 0, 1) * tokens.shape[1] + jnp.arange(tokens.shape[1]),
                      axis=1)[:, :num_slots]
  order = jnp.where(jnp.take_along_axis(is_slot, order, axis=1), order, 0)
  return jnp.take_along_axis(x, order[..., None], axis=1)


class KptLLM(VLM):
  """VLM + KptLLM's support inputs and ``<keypoint>`` regression head (module docstring)."""

  def setup(self):
    super().setup()
    c = self.config
    dtype = layers.to_dtype(c.dtype)
    e = c.vit.hidden_size
    self.extractor_kind = c.kpt.get("prompt_extractor", "cross_attention")
    if self.extractor_kind not in PROMPT_EXTRACTORS:
      raise ConfigError(f"model.kpt.prompt_extractor={self.extractor_kind!r} (expected one "
                        f"of {PROMPT_EXTRACTORS})")
    if self.extractor_kind == "cross_attention":
      self.prompt_encoder = PromptEncoder(e, dtype)
      self.prompt_extractor = PromptExtractor(int(c.kpt.extractor_layers), c.vit.num_heads,
                                              c.vit.intermediate_size, dtype)
    self.prompt_projector = _dense(c.llm.hidden_size, ("vit_embed", "embed"), None, dtype)
    self.keypoint_head = KeypointHead(c.llm.hidden_size, dtype)

  def embed_prompts(self, support_images: Array, support_xy: Array, support_mask: Array,
                    deterministic: bool = True) -> Array:
    """Keypoint prompt tokens, averaged over the shots where the keypoint is labeled.

    Args:
      support_images: f32[B,S,H,W,3] (normalized crops); support_xy: f32[B,S,R,2]
        (normalized support-crop units); support_mask: f32[B,S,R] (1 = labeled).

    Returns:
      f32[B,R,D] (the projection of zeros where no shot labels the keypoint; such
      slots are not in the token sequence).
    """
    b, s = support_images.shape[:2]
    feats = self.vit(support_images.reshape(b * s, *support_images.shape[2:]),
                     deterministic=deterministic)                          # [B*S,P,E]
    xy = support_xy.reshape(b * s, -1, 2)
    if self.extractor_kind == "avg_pool":
      z = avg_pool_prompts(feats, xy, float(self.config.kpt.get("avg_pool_sigma", 1.0)))
    else:
      z = self.prompt_extractor(self.prompt_encoder(xy), feats)               # [B*S,R,E]
    z = z.reshape(b, s, -1, z.shape[-1])
    w = support_mask.astype(jnp.float32)[..., None]
    z = jnp.sum(z * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)       # [B,R,E]
    return self.prompt_projector(z).astype(jnp.float32)

  def __call__(self, images: Array, tokens: Array, input_mask: Array, *,
               support_images: Array | None = None, support_xy: Array | None = None,
               support_mask: Array | None = None, num_keypoint_slots: int | None = None,
               deterministic: bool = True, return_hidden: bool = False):
    """Teacher-forced logits and the regressed keypoints.

    Args:
      images, tokens, input_mask: as ``VLM.__call__``; tokens may hold R prompt slots
        (``kpt.prompt_token_id``) filled in order from the support prompts, and
        ``<keypoint>`` tokens (``kpt.keypoint_token_id``).
      support_images, support_xy, support_mask: see ``embed_prompts`` (None: no prompts).
      num_keypoint_slots: R' regression outputs per row (default: R of support_xy, else 1).
      return_hidden: the last block's output [B,T,D] in place of the logits (as VLM's).

    Returns:
      (logits f32[B,T,V], xy f32[B,R',2]): xy[b, r] is the head's output at row b's r-th
      ``<keypoint>`` input token.
    """
    k = self.config.kpt
    x = self._embed(tokens, self.embed_image(images, deterministic))
    if support_images is not None:
      prompt = self.embed_prompts(support_images, support_xy, support_mask, deterministic)
      x = fill_image_tokens(x, tokens, prompt, int(k.prompt_token_id))
    h = self.llm.hidden(x, input_mask, deterministic)
    if num_keypoint_slots is None:
      num_keypoint_slots = support_xy.shape[2] if support_xy is not None else 1
    u = gather_slots(self.llm.norm(h), tokens, int(k.keypoint_token_id), num_keypoint_slots)
    return (h if return_hidden else self.llm.logits(h)), self.keypoint_head(u)

  def embed_tokens(self, tokens: Array, image_embeds: Array | None = None,
                   prompt_embeds: Array | None = None) -> Array:
    """``VLM.embed_tokens`` with the prompt slots filled, in order, from prompt_embeds
    [B,R,D] (``embed_prompts``)."""
    x = self._embed(tokens, image_embeds)
    if prompt_embeds is not None:
      x = fill_image_tokens(x, tokens, prompt_embeds, int(self.config.kpt.prompt_token_id))
    return x

  def read(self, h: Array) -> tuple[Array, dict[str, Array]]:
    """``VLM.read`` plus the regression head: h [B,D] -> (logits f32[B,V], {'xy':
    f32[B,2]}); the xy read at a ``<keypoint>`` input token is its regressed position."""
    logits, _ = super().read(h)
    return logits, {"xy": self.keypoint_head(self.llm.norm(h))}


def dummy_support(model_config: ml_collections.ConfigDict, batch: int = 1, shots: int = 1,
                  slots: int = 1) -> dict[str, Array]:
  """Shape-only support inputs: images [B,S,H,W,3], xy [B,S,R,2], mask [B,S,R]."""
  side = model_config.vit.image_size
  return dict(support_images=jnp.zeros((batch, shots, side, side, 3), jnp.float32),
              support_xy=jnp.zeros((batch, shots, slots, 2), jnp.float32),
              support_mask=jnp.ones((batch, shots, slots), jnp.float32))


def init_params(model_config: ml_collections.ConfigDict, rng: Array) -> Any:
  """Randomly initialized KptLLM params (unboxed), for tests and tiny configs."""
  model = KptLLM(model_config)
  variables = jax.jit(lambda key: model.init(key, *dummy_inputs(model_config),
                                             **dummy_support(model_config)))(rng)
  return nn.meta.unbox(variables["params"])


def abstract_params(model_config: ml_collections.ConfigDict) -> Any:
  """ShapeDtypeStructs of the KptLLM params (boxed with logical axes), no allocation."""
  model = KptLLM(model_config)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs(model_config),
                                                **dummy_support(model_config)))
  return variables["params"]
