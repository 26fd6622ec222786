"""The composite model: ViT patch tokens -> projector -> image tokens placed into the
Llama token sequence at the placeholder slots.

Param tree: {'vit': ..., 'projector': ..., 'llm': ...}. Entry points:
  ``__call__``     teacher-forced logits for a batch of images + token sequences;
                   optionally the LLM attention probabilities (for inspection).
  ``embed_image``  images -> image tokens.
  ``extend``       the one cached path: T new tokens (image tokens filled from
                   ``image_embeds`` when given) appended at each row's cache end.
                   ``prefill`` = extend with the images embedded (on an empty cache);
                   ``decode_step`` = extend with T=1.
  ``extend_hidden`` + ``read``  the same without vocabulary logits, which ``read`` computes
                   only where a decoder reads (``kptjax.inference.decode``).

    >>> model = VLM(config.model)
    >>> logits = model.apply({'params': params}, images, tokens, input_mask)
    >>> cache = init_cache(config.model, batch=B, max_len=S)
    >>> img = model.apply({'params': params}, images, method='embed_image')
    >>> logits, cache = model.apply({'params': params}, prompt, prompt_mask, cache,
    ...                             image_embeds=img, method='extend')
    >>> logits, cache = model.apply({'params': params}, next_token, cache,
    ...                             method='decode_step')
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util

from kptjax.errors import ConfigError
from kptjax.models import llama as llama_lib
from kptjax.models.layers import to_dtype
from kptjax.models.llama import Cache, Llama, LlamaConfig
from kptjax.models.lora import LoraSpec
from kptjax.models.projector import Projector
from kptjax.models.vit import ViT

Array = jax.Array
CACHE_AXES = llama_lib.CACHE_AXES
# config.model fields read with a default: model configs saved before they existed (a
# workdir's model_config.json, a converted checkpoint's metadata) build as they did then.
OPTIONAL_FIELDS = {"attention": "einsum", "unroll_layers": False}


def num_image_tokens(model_config: ml_collections.ConfigDict) -> int:
  """N = (image_size / patch_size)^2 image tokens per image."""
  side = model_config.vit.image_size // model_config.vit.patch_size
  return side * side


def fill_image_tokens(x: Array, tokens: Array, image_embeds: Array,
                      image_token_id: int) -> Array:
  """Replaces, in order, the rows' placeholder positions with image tokens.

  Args:
    x: [B,T,D] token embeddings; tokens: i32[B,T]; image_embeds: [B,N,D].
    image_token_id: the placeholder id. Each row is expected to hold exactly N
      placeholders (more reuse the last image token; fewer leave image tokens unused).

  Returns:
    [B,T,D] in x's dtype.
  """
  is_image = tokens == image_token_id
  index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, image_embeds.shape[1] - 1)
  gathered = jnp.take_along_axis(image_embeds, index[..., None], axis=1)
  return jnp.where(is_image[..., None], gathered.astype(x.dtype), x)


class VLM(nn.Module):
  """ViT + projector + Llama. ``config`` is ``config.model`` (see configs/tiny.py)."""
  config: ml_collections.ConfigDict

  def setup(self):
    c = self.config
    dtype, param_dtype = to_dtype(c.dtype), to_dtype(c.param_dtype)
    attention = c.get("attention", OPTIONAL_FIELDS["attention"])
    unroll = bool(c.get("unroll_layers", OPTIONAL_FIELDS["unroll_layers"]))  # scan_blocks
    self.vit = ViT(c.vit, lora=c.lora, dtype=dtype, param_dtype=param_dtype,
                   remat_policy=c.remat_policy, attention=attention, unroll_layers=unroll)
    # Always trained, so stored in float32 whatever the frozen towers use.
    self.projector = Projector(c.projector.kind, c.llm.hidden_size, dtype=dtype,
                               param_dtype=jnp.float32)
    self.llm = Llama(LlamaConfig.from_config(c.llm), LoraSpec.from_config(c.lora, "llm"),
                     dtype=dtype, param_dtype=param_dtype, scan_layers=c.scan_layers,
                     remat_policy=c.remat_policy, attention=attention,
                     unroll_layers=unroll)

  def embed_image(self, images: Array, deterministic: bool = True) -> Array:
    """images f32[B,H,W,3] (normalized) -> image tokens f32[B,N,D_llm]."""
    feats = self.vit(images, deterministic=deterministic)
    return self.projector(feats).astype(jnp.float32)

  def _embed(self, tokens: Array, image_embeds: Array | None) -> Array:
    x = self.llm.embed(tokens)
    if image_embeds is None:
      return x
    return fill_image_tokens(x, tokens, image_embeds, self.config.image_token_id)

  def __call__(self, images: Array, tokens: Array, input_mask: Array, *,
               deterministic: bool = True, return_attention: bool = False,
               return_hidden: bool = False):
    """Teacher-forced logits.

    Args:
      images: f32[B,H,W,3]; tokens: i32[B,T] with N placeholders per row;
      input_mask: bool[B,T] (True on real tokens, right padding).
      deterministic: False enables LoRA dropout (rng 'dropout').
      return_attention: also return the LLM's attention probabilities f32[L,B,H,T,T].
      return_hidden: return the last block's output [B,T,D] instead of the logits
        (``logits(hidden)`` gives them; the train step's loss reads them in chunks).

    Returns:
      logits f32[B,T,V] (or the hidden [B,T,D]), and the attention when return_attention.
    """
    x = self._embed(tokens, self.embed_image(images, deterministic))
    if return_hidden:
      return self.llm.hidden(x, input_mask, deterministic)
    return self.llm(None, input_mask, embeds=x, deterministic=deterministic,
                    return_attention=return_attention)

  def logits(self, hidden: Array) -> Array:
    """Final norm and output layer over any slice of ``__call__``'s hidden: [B,C,D] ->
    f32[B,C,V]."""
    return self.llm.logits(hidden)

  def extend(self, tokens: Array, input_mask: Array, cache: Cache, *,
             image_embeds: Array | None = None) -> tuple[Array, Cache]:
    """Appends T tokens per row at the rows' cache ends; returns their logits.

    Args:
      tokens: i32[B,T]; input_mask: bool[B,T] (right padding).
      cache: from ``init_cache`` / ``llama.with_prefix`` or a previous call (S >= end + T).
      image_embeds: f32[B,N,D] from ``embed_image`` when the tokens hold placeholders.

    Returns:
      (logits f32[B,T,V], cache with end += sum(input_mask, axis=1)).
    """
    h, cache = self.extend_hidden(tokens, input_mask, cache, image_embeds=image_embeds)
    return self.llm.logits(h), cache

  def embed_tokens(self, tokens: Array, image_embeds: Array | None = None,
                   prompt_embeds: Array | None = None) -> Array:
    """tokens i32[B,T] -> [B,T,D], placeholders filled from image_embeds [B,N,D]. A plain
    VLM has no prompt slots (KptLLM fills them from prompt_embeds [B,R,D])."""
    if prompt_embeds is not None:
      raise ConfigError("prompt embeddings need a KptLLM model (model.kpt.enabled)")
    return self._embed(tokens, image_embeds)

  def extend_hidden(self, tokens: Array, input_mask: Array, cache: Cache, *,
                    image_embeds: Array | None = None, prompt_embeds: Array | None = None,
                    read: Array | None = None) -> tuple[Array, Cache]:
    """``extend`` returning the last block's output [B,T,D] instead of logits, so that
    ``read`` runs only at the positions a decoder reads; with ``read`` i32[B] only that
    position of each row, [B,1,D] (``Llama.extend_hidden``)."""
    x = self.embed_tokens(tokens, image_embeds, prompt_embeds)
    return self.llm.extend_hidden(input_mask, cache, x, read)

  def read(self, h: Array) -> tuple[Array, dict[str, Array]]:
    """What a decoder reads at a position: h [B,D] (``extend_hidden``) -> (next-token
    logits f32[B,V], {} (a KptLLM adds the regression head's 'xy')."""
    return self.llm.logits(h[:, None])[:, 0], {}

  def prefill(self, images: Array, tokens: Array, input_mask: Array,
              cache: Cache) -> tuple[Array, Cache]:
    """``extend`` with the images' tokens filling the placeholders (usually on an empty
    cache): images f32[B,H,W,3], tokens i32[B,T] -> (logits f32[B,T,V], cache)."""
    return self.extend(tokens, input_mask, cache, image_embeds=self.embed_image(images))

  def decode_step(self, token: Array, cache: Cache) -> tuple[Array, Cache]:
    """One token per row: token i32[B] -> (logits f32[B,V], cache with end += 1)."""
    logits, cache = self.extend(token[:, None], jnp.ones((token.shape[0], 1), bool), cache)
    return logits[:, 0], cache


def init_cache(model_config: ml_collections.ConfigDict, batch: int, max_len: int,
               dtype: Any = None) -> Cache:
  """Empty KV cache (``llama.init_cache``: {'k','v': L x [B,Hkv,S,D] zeros, 'end':
  i32[B] zeros}); dtype defaults to config.model.dtype."""
  return llama_lib.init_cache(model_config.llm, batch, max_len,
                              dtype if dtype is not None else model_config.dtype)


def dummy_inputs(model_config: ml_collections.ConfigDict, batch: int = 1,
                 text_len: int = 4) -> tuple[Array, Array, Array]:
  """Shape-only inputs for init / eval_shape: images [B,H,W,3], tokens [B,N+text_len]
  (N placeholders, then text_len ones), input_mask all True."""
  s = model_config.vit.image_size
  n = num_image_tokens(model_config)
  tokens = jnp.concatenate([jnp.full((batch, n), model_config.image_token_id, jnp.int32),
                            jnp.ones((batch, text_len), jnp.int32)], axis=1)
  return (jnp.zeros((batch, s, s, 3), jnp.float32), tokens,
          jnp.ones(tokens.shape, bool))


def abstract_params(model_config: ml_collections.ConfigDict) -> Any:
  """ShapeDtypeStructs of the VLM params (boxed with logical axes), no allocation."""
  model = VLM(model_config)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs(model_config)))
  return variables["params"]


def init_params(model_config: ml_collections.ConfigDict, rng: Array) -> Any:
  """Randomly initialized VLM params (unboxed) — for tests and tiny configs."""
  model = VLM(model_config)
  variables = jax.jit(lambda key: model.init(key, *dummy_inputs(model_config)))(rng)
  return rescale_init(nn.meta.unbox(variables["params"]), model_config)


INIT_KINDS = ("hf", "fan_in")
_TOWERS = ("llm", "vit", "projector")


def rescale_init(params: Any, model_config: ml_collections.ConfigDict) -> Any:
  """Applies ``model_config.init`` to freshly initialized (unboxed) params.

  'hf' (default): as the modules draw them, normal(0.02) weights (the Hugging Face
  ``initializer_range`` of Llama / DINOv2; pretrained towers replace them anyway).
  'fan_in': for towers trained from scratch at small width (the CPU demo): every
  kernel of the ViT, projector and LLM rescaled to std 1/sqrt(fan in) (fan in = the
  kernel's second-to-last axis: kernels are [layers?, in, out]) and the token
  embeddings to std 1, so that attention logits and residual branches start at unit
  scale (0.02 at width 128 starts every attention nearly uniform). LoRA factors,
  norms, biases and other modules' params are left as drawn. Works under jit.
  """
  kind = model_config.get("init", "hf")
  if kind not in INIT_KINDS:
    raise ConfigError(f"model.init={kind!r}; expected one of {INIT_KINDS}")
  if kind == "hf":
    return params
  flat = traverse_util.flatten_dict(params, sep="/")
  out = {}
  for path, value in flat.items():
    parts = path.split("/")
    if parts[0] in _TOWERS and "lora" not in path:
      if parts[-1] in ("kernel", "patch_kernel"):
        value = value * ((value.shape[-2] ** -0.5) / 0.02)
      elif parts[-1] == "embedding":
        value = value * (1.0 / 0.02)
    out[path] = value
  return traverse_util.unflatten_dict(out, sep="/")
