"""ViT image encoder, DINOv2- and CLIP-compatible (transformers' Dinov2Model /
Dinov2WithRegistersModel / CLIPVisionModel).

    image [B,H,W,3] -> patches (conv p x p, stride p) -> [cls, patches] + position embeddings
    -> [cls, registers, patches] -> L pre-norm blocks with LayerScale -> final LayerNorm.

CLIP (``kptjax.convert.clip``) differs by config fields whose defaults are DINOv2's:
``patch_bias=False`` (bias-free patch conv), ``pre_layernorm=True`` (LayerNorm 'pre_norm'
on the embeddings, CLIP's ``pre_layrnorm``), ``layerscale=False`` (no LayerScale params),
``final_layernorm=False`` (CLIP's post_layernorm only touches the pooled class token, so
LLaVA's features are a block's raw output) and ``hidden_act='quick_gelu'``.

Axis letters (see kptjax.models.layers): B batch, T tokens (1 + R registers + P patches),
D width, N heads, H head dim, F mlp width.

Position embeddings are stored at the pretrained grid (``pretrained_image_size / patch``)^2
plus one class position and resized to the input grid with torch's bicubic resampling,
reproduced exactly here (``torch_bicubic_matrix``): Dinov2Model uses
``F.interpolate(mode='bicubic', align_corners=False)``, Dinov2WithRegistersModel adds
``antialias=True`` (config field ``interpolate_antialias``). A 518-pixel checkpoint used at
224 pixels gives a 16x16 grid from its 37x37 embeddings.

Params (blocks stacked on a leading 'layers' axis by ``nn.scan``)::

  embeddings/{patch_kernel [p*p*3,D], patch_bias [D] (patch_bias only), cls_token [D],
              pos_embed [1+G*G, D] ('learned' only), register_tokens [R,D] (R > 0 only)}
  pre_norm/{scale, bias}    (pre_layernorm only)
  layers/{norm1/{scale,bias}, attention/{query,key,value,out}/{kernel,bias},
          layer_scale1 [D], norm2, mlp/{fc1,fc2} or mlp/{gate,up,down}, layer_scale2 [D]}
          (layer_scale1/2 only with layerscale)
  norm/{scale, bias}        (final_layernorm only)

Linear layers are ``LoraDense``; the ones named in ``lora.vit_targets`` (e.g. 'query',
'value') carry an adapter when ``lora.rank > 0``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kptjax.errors import ConfigError
from kptjax.models import layers
from kptjax.models.layers import DType, logical_init
from kptjax.models.lora import LoraDense

Array = jax.Array

# Names of the ViT's linear layers: what ``lora.vit_targets`` may list.
LINEAR_NAMES = ("query", "key", "value", "out", "fc1", "fc2", "gate", "up", "down")

_ACTIVATIONS = {
    "gelu": functools.partial(nn.gelu, approximate=False),      # torch nn.GELU() / HF 'gelu'
    "gelu_new": functools.partial(nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
}


# ------------------------------------------------------------- bicubic, as torch does it
def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel with parameter a (torch: -0.75; PIL / antialias: -0.5)."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def torch_bicubic_matrix(in_size: int, out_size: int, antialias: bool = False) -> np.ndarray:
  """Resampling matrix f32[out_size, in_size] of ``torch.nn.functional.interpolate``
  (mode='bicubic', align_corners=False, size=...) along one axis.

  Without antialias (torch's upsample_bicubic2d): source coordinate (i + 0.5) * in/out - 0.5,
  4 taps with a = -0.75, indices clamped to the border. With antialias (torch's
  _upsample_bicubic2d_aa, PIL's filter): a = -0.5, the kernel stretched by in/out when
  downsampling, taps cut at the border and the weights renormalized. (``jax.image.resize``
  'bicubic' matches only the antialiased variant; it has no a = -0.75 kernel.) Weights are
  computed in float64; torch's own float32 coordinate arithmetic differs by ~1e-6.
  """
  scale = in_size / out_size
  w = np.zeros((out_size, in_size), np.float64)
  if not antialias:
    for i in range(out_size):
      src = (i + 0.5) * scale - 0.5
      base = math.floor(src)
      t = src - base
      coeffs = _cubic(np.array([t + 1, t, 1 - t, 2 - t]), -0.75)
      for tap, c in zip(range(base - 1, base + 3), coeffs):
        w[i, min(max(tap, 0), in_size - 1)] += c
  else:
    support = 2.0 * scale if scale >= 1.0 else 2.0
    inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
    for i in range(out_size):
      center = scale * (i + 0.5)
      lo = max(int(center - support + 0.5), 0)
      hi = min(int(center + support + 0.5), in_size)
      taps = np.arange(lo, hi)
      coeffs = _cubic((taps - center + 0.5) * inv_scale, -0.5)
      total = coeffs.sum()
      w[i, lo:hi] = coeffs / total if total != 0 else coeffs
  return w.astype(np.float32)


def resize_bicubic(grid: Array, out_hw: tuple[int, int], antialias: bool = False) -> Array:
  """Resizes grid [h, w, C] to [out_h, out_w, C] like torch's bicubic interpolate, in f32."""
  h, w, _ = grid.shape
  mh = torch_bicubic_matrix(h, out_hw[0], antialias)
  mw = torch_bicubic_matrix(w, out_hw[1], antialias)
  return jnp.einsum("oh,pw,hwc->opc", mh, mw, grid.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
  """Fixed 2D sin-cos position embeddings f32[h*w, width] (MoCo v3 / big_vision layout)."""
  if width % 4:
    raise ConfigError(f"model.vit.hidden_size={width}: pos_embed='sincos2d' needs a multiple of 4")
  y, x = np.mgrid[:h, :w]
  omega = np.arange(width // 4) / max(width // 4 - 1, 1)
  omega = 1.0 / temperature ** omega
  y = np.einsum("m,d->md", y.reshape(-1), omega)
  x = np.einsum("m,d->md", x.reshape(-1), omega)
  return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


# ------------------------------------------------------------------------------ modules
def _layer_norm(config, param_dtype, name):
  return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=jnp.float32, param_dtype=param_dtype,
                      scale_init=logical_init(nn.initializers.ones, ("vit_embed",)),
                      bias_init=logical_init(nn.initializers.zeros, ("vit_embed",)), name=name)


class _Sublayer(nn.Module):
  """What Attention, Mlp and Block are built from: the ViT config (config.model.vit),
  the LoRA settings (config.model.lora or None) and the compute / storage dtypes."""
  config: ml_collections.ConfigDict
  lora: Any = None
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32
  attention: str = "einsum"          # layers.ATTENTION_IMPLS (config.model.attention)

  def _dense(self, features, axes, name, use_bias=True) -> LoraDense:
    """A LoraDense child named ``name``, with LoRA when ``name`` is in lora.vit_targets."""
    lora = self.lora
    rank = int(lora.rank) if lora is not None and name in list(lora.vit_targets) else 0
    return LoraDense(features=features, use_bias=use_bias, rank=rank,
                     alpha=float(lora.alpha) if rank else 1.0,
                     dropout=float(lora.dropout) if rank else 0.0,
                     kernel_axes=axes, dtype=self.dtype, param_dtype=self.param_dtype,
                     name=name)


class Attention(_Sublayer):
  """Bidirectional multi-head self-attention, q/k/v/out as separate LoraDense layers."""

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    """x [B,T,D] -> [B,T,D]."""
    c = self.config
    b, t, d = x.shape
    n = c.num_heads
    dense = self._dense
    q, k, v = (dense(d, ("vit_embed", "heads"), name, use_bias=c.qkv_bias)(x, deterministic)
               .reshape(b, t, n, d // n) for name in ("query", "key", "value"))
    out, _ = layers.attention(q, k, v, impl=self.attention)
    out = layers.constrain(out, layers.ACT_HEADS)
    return dense(d, ("heads", "vit_embed"), "out")(out.reshape(b, t, d), deterministic)


class Mlp(_Sublayer):
  """fc1 -> activation -> fc2, or the SwiGLU FFN (down(silu(gate(x)) * up(x))) of DINOv2-g."""

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    """x [B,T,D] -> [B,T,D]; hidden width F = config.intermediate_size."""
    c = self.config
    d, f = x.shape[-1], c.intermediate_size
    dense = self._dense
    if c.use_swiglu_ffn:
      h = (nn.silu(dense(f, ("vit_embed", "mlp"), "gate")(x, deterministic))
           * dense(f, ("vit_embed", "mlp"), "up")(x, deterministic))
      return dense(d, ("mlp", "vit_embed"), "down")(h, deterministic)
    if c.hidden_act not in _ACTIVATIONS:
      raise ConfigError(f"model.vit.hidden_act={c.hidden_act!r} (expected one of "
                        f"{sorted(_ACTIVATIONS)})")
    h = _ACTIVATIONS[c.hidden_act](dense(f, ("vit_embed", "mlp"), "fc1")(x, deterministic))
    h = layers.constrain(h, layers.ACT_MLP)
    return dense(d, ("mlp", "vit_embed"), "fc2")(h, deterministic)


class Block(_Sublayer):
  """Pre-norm block: x += ls1 * attn(norm1(x)); x += ls2 * mlp(norm2(x)) (ls = 1 without
  ``layerscale``). Written for nn.scan.

  ``keep_layer`` >= 0 makes the carry ``(x, kept)`` where kept is the output of that layer.
  """
  keep_layer: int = -1

  @nn.compact
  def __call__(self, carry, index: Array, deterministic: bool = True):
    c = self.config
    x = layers.constrain(carry[0] if self.keep_layer >= 0 else carry, layers.ACT_VIT_EMBED)
    d = x.shape[-1]
    kw = dict(config=c, lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype,
              attention=self.attention)
    if c.get("layerscale", True):
      scale_init = logical_init(nn.initializers.constant(c.layerscale_value), ("vit_embed",))
      ls1 = self.param("layer_scale1", scale_init, (d,), self.param_dtype).astype(self.dtype)
      ls2 = self.param("layer_scale2", scale_init, (d,), self.param_dtype).astype(self.dtype)
    else:   # CLIP: no LayerScale
      ls1 = ls2 = None

    h = _layer_norm(c, self.param_dtype, "norm1")(x).astype(self.dtype)
    h = Attention(**kw, name="attention")(h, deterministic)
    x = x + (h if ls1 is None else h * ls1)
    h = _layer_norm(c, self.param_dtype, "norm2")(x).astype(self.dtype)
    h = Mlp(**kw, name="mlp")(h, deterministic)
    x = layers.constrain(x + (h if ls2 is None else h * ls2), layers.ACT_VIT_EMBED)
    if self.keep_layer >= 0:
      return (x, jnp.where(index == self.keep_layer, x, carry[1])), None
    return x, None


class Embeddings(nn.Module):
  """Patch embedding, class token, position embeddings, register tokens."""
  config: ml_collections.ConfigDict
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  def _position_embeddings(self, grid_hw: tuple[int, int]) -> Array:
    """f32[1 + gh*gw, D]: the class position, then the patch positions in row-major order."""
    c = self.config
    d = c.hidden_size
    if c.pos_embed == "sincos2d":
      pe = posemb_sincos_2d(*grid_hw, d)
      return jnp.asarray(np.concatenate([np.zeros((1, d), np.float32), pe]))
    if c.pos_embed != "learned":
      raise ConfigError(f"model.vit.pos_embed={c.pos_embed!r} (expected 'learned' or 'sincos2d')")
    g = c.pretrained_image_size // c.patch_size
    pos = self.param("pos_embed", logical_init(nn.initializers.truncated_normal(0.02),
                                               (None, "vit_embed")),
                     (1 + g * g, d), self.param_dtype)
    if grid_hw == (g, g):
      return pos.astype(jnp.float32)
    patch_pos = resize_bicubic(pos[1:].reshape(g, g, d), grid_hw,
                               antialias=bool(c.get("interpolate_antialias", False)))
    # torch resizes in f32 and casts back to the stored dtype before the add.
    patch_pos = patch_pos.astype(pos.dtype).reshape(-1, d)
    return jnp.concatenate([pos[:1], patch_pos]).astype(jnp.float32)

  @nn.compact
  def __call__(self, images: Array) -> Array:
    """images f32[B,H,W,3] -> tokens [B, 1+R+P, D] (class, registers, patches; P = gh*gw)."""
    c = self.config
    p, d = c.patch_size, c.hidden_size
    b, h, w, ch = images.shape
    gh, gw = h // p, w // p
    # The p x p stride-p conv as a dense layer over flattened (row, column, channel) patches.
    kernel = self.param("patch_kernel", logical_init(layers.default_kernel_init,
                                                     ("patch", "vit_embed")),
                        (p * p * ch, d), self.param_dtype)
    x = images[:, :gh * p, :gw * p].astype(self.dtype).reshape(b, gh, p, gw, p, ch)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, p * p * ch)
    x = jnp.einsum("BPK,KD->BPD", x, kernel.astype(self.dtype))
    if c.get("patch_bias", True):   # CLIP's patch conv has no bias
      bias = self.param("patch_bias", logical_init(nn.initializers.zeros, ("vit_embed",)),
                        (d,), self.param_dtype)
      x = x + bias.astype(self.dtype)

    cls = self.param("cls_token", logical_init(nn.initializers.truncated_normal(0.02),
                                               ("vit_embed",)), (d,), self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d)), x], axis=1)
    x = x + self._position_embeddings((gh, gw)).astype(self.dtype)
    if c.num_register_tokens:
      reg = self.param("register_tokens", logical_init(nn.initializers.zeros,
                                                       (None, "vit_embed")),
                       (c.num_register_tokens, d), self.param_dtype)
      reg = jnp.broadcast_to(reg.astype(self.dtype), (b, c.num_register_tokens, d))
      x = jnp.concatenate([x[:, :1], reg, x[:, 1:]], axis=1)
    return x


class ViT(nn.Module):
  """DINOv2-compatible ViT encoder.

  Attributes:
    config: ``config.model.vit`` (configs/common.py ``vit_config``).
    lora: ``config.model.lora`` (rank, alpha, dropout, vit_targets) or None; rank 0 = off.
    dtype: compute dtype; param_dtype: storage dtype. Norms, softmax and the position
      embedding resize run in float32.
    remat_policy: a ``jax.checkpoint_policies`` name (``config.model.remat_policy``) or 'none'.
    attention: a ``layers.ATTENTION_IMPLS`` name (``config.model.attention``).
    unroll_layers: run the scanned blocks unrolled (``layers.scan_blocks``;
      ``config.model.unroll_layers``); the params are the same.
  """
  config: ml_collections.ConfigDict
  lora: Any = None
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32
  remat_policy: str = "none"
  attention: str = "einsum"
  unroll_layers: bool = False

  def _feature_layer(self) -> int:
    c = self.config
    fl = int(c.feature_layer)
    if not -c.num_layers <= fl < c.num_layers:
      raise ConfigError(f"model.vit.feature_layer={fl}: expected a block index in "
                        f"[-{c.num_layers}, {c.num_layers - 1}]")
    return fl % c.num_layers

  @nn.compact
  def __call__(self, images: Array, deterministic: bool = True,
               return_all: bool = False) -> Array:
    """Encodes images.

    Args:
      images: f32[B,H,W,3], normalized pixels; H, W multiples of patch_size (the remainder
        is cropped, as torch's strided conv does).
      deterministic: False enables LoRA dropout (rng 'dropout').
      return_all: return every token instead of the patch tokens.

    Returns:
      f32[B,P,D], P = (H/p)*(W/p): the patch tokens of block ``config.feature_layer``
      (Python-style index over blocks; -1 = last), normalized by the final LayerNorm
      (unless ``final_layernorm`` is False: CLIP / LLaVA take the raw block output);
      class and register tokens dropped (LocLLM). With return_all, all 1+R+P tokens of
      that block; with feature_layer=-1 this is HF's ``last_hidden_state`` (DINOv2 and
      CLIP); CLIP's ``hidden_states[k]`` is feature_layer=k-1 (hidden_states[-2] = -2).
    """
    c = self.config
    keep = self._feature_layer()
    if self.lora is not None and self.lora.rank:
      unknown = sorted(set(self.lora.vit_targets) - set(LINEAR_NAMES))
      if unknown:
        raise ConfigError(f"model.lora.vit_targets: {unknown} name no ViT layer "
                          f"(expected some of {LINEAR_NAMES})")
    x = Embeddings(c, self.dtype, self.param_dtype, name="embeddings")(images)
    if c.get("pre_layernorm", False):   # CLIP's pre_layrnorm
      x = _layer_norm(c, self.param_dtype, "pre_norm")(x).astype(self.dtype)
    block = layers.maybe_remat(Block, self.remat_policy, static_argnums=(3,))
    stack = layers.scan_blocks(block, c.num_layers, in_axes=(0, nn.broadcast),
                               unroll=self.unroll_layers)(
        config=c, lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype,
        attention=self.attention, keep_layer=-1 if keep == c.num_layers - 1 else keep, name="layers")
    carry = x if keep == c.num_layers - 1 else (x, jnp.zeros_like(x))
    carry, _ = stack(carry, jnp.arange(c.num_layers), deterministic)
    x = carry if keep == c.num_layers - 1 else carry[1]
    if c.get("final_layernorm", True):
      x = _layer_norm(c, self.param_dtype, "norm")(x)
    else:   # float32 either way (the LayerNorm computes in float32)
      x = x.astype(jnp.float32)
    return x if return_all else x[:, 1 + c.num_register_tokens:]
