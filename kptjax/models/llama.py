"""Llama decoder (Llama-2 / Vicuna / Llama-3.x): RMSNorm, RoPE (default or llama3 scaling),
grouped-query attention, SwiGLU MLP, tied or untied embeddings, LoRA on named projections.

Param names follow Hugging Face's LlamaForCausalLM (``embed_tokens``, ``layers``,
``self_attn/{q,k,v,o}_proj``, ``mlp/{gate,up,down}_proj``, ``input_layernorm``,
``post_attention_layernorm``, ``norm``, ``lm_head``) so conversion is a rename plus a
transpose. With ``scan_layers`` the block params are stacked on a leading 'layers' axis
under ``layers``; otherwise they live under ``layers_0 .. layers_{L-1}``.

Two entry points share the blocks:
  ``__call__``: teacher-forced logits over a whole (right-padded) sequence.
  ``extend``: writes T new tokens into an explicit KV cache at per-row offsets and returns
  their logits (prefill = extend on an empty cache, decode = extend with T = 1);
  ``extend_hidden`` returns the last block's output instead, so a caller computes
  vocabulary logits only at the positions it reads.

The KV cache (decode time only, see ``init_cache``): one buffer per layer, heads before
positions, so that a decode step's attention reads each buffer as a matmul operand and
writes one slot in place (no per-layer slicing, no transposes):

    {'k': L x [B,K,S,H], 'v': L x [B,K,S,H], 'end': i32[B]}
    + optionally 'prefix': {'k': L x [P,K,Sp,H], 'v': ..., 'end': i32[P]}

With a prefix (``with_prefix``), B = P * Q rows, person-major (row b belongs to prefix
row b // Q): the prefix is stored once per person, each row holds only its own suffix,
and attention merges the two parts exactly (``cached_attention``).
Einsum letters: see kptjax/models/layers.py (P prefix rows, Q rows per prefix).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from kptjax.errors import ConfigError
from kptjax.models import layers
from kptjax.models.layers import DType, RMSNorm, logical_init
from kptjax.models.lora import LoraDense, LoraSpec

Array = jax.Array
Cache = dict[str, Any]   # see the module docstring and init_cache


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """The architecture numbers (names follow configs/common.py llm_config)."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] = ()   # sorted items of the rope_scaling dict
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 2048
  new_tokens: int = 0   # rows past the checkpoint's vocabulary (added tokens), of vocab_size

  @property
  def base_vocab_size(self) -> int:
    """Rows of the checkpoint's embedding table (``vocab_size - new_tokens``)."""
    return self.vocab_size - self.new_tokens

  @classmethod
  def from_config(cls, c: Any) -> "LlamaConfig":
    """From config.model.llm (ConfigDict or dict) or a LlamaConfig."""
    if isinstance(c, LlamaConfig):
      return c
    c = c.to_dict() if hasattr(c, "to_dict") else dict(c)
    if c["num_heads"] % c["num_kv_heads"]:
      raise ConfigError(f"model.llm: num_heads={c['num_heads']} is not a multiple of "
                        f"num_kv_heads={c['num_kv_heads']}")
    scaling = dict(c.get("rope_scaling") or {})
    return cls(vocab_size=int(c["vocab_size"]), hidden_size=int(c["hidden_size"]),
               intermediate_size=int(c["intermediate_size"]),
               num_layers=int(c["num_layers"]), num_heads=int(c["num_heads"]),
               num_kv_heads=int(c["num_kv_heads"]),
               head_dim=int(c.get("head_dim") or c["hidden_size"] // c["num_heads"]),
               rope_theta=float(c.get("rope_theta", 10000.0)),
               rope_scaling=tuple(sorted(scaling.items())),
               rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
               tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
               max_position_embeddings=int(c.get("max_position_embeddings", 2048)),
               new_tokens=int(c.get("new_tokens", 0) or 0))

  @property
  def rope_scaling_dict(self) -> dict:
    return dict(self.rope_scaling)


class _Sublayer(nn.Module):
  """What MLP, Attention and DecoderBlock are built from: the LlamaConfig, the tower's
  LoraSpec and the compute / storage dtypes."""
  config: LlamaConfig
  lora: LoraSpec = LoraSpec()
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32
  attention: str = "einsum"          # layers.ATTENTION_IMPLS (config.model.attention)

  def _dense(self, name: str, features: int, axes: tuple[str, str]) -> LoraDense:
    """A LoraDense child named ``name``, with LoRA when ``name`` is a lora target."""
    return LoraDense(features, rank=self.lora.rank_for(name), alpha=self.lora.alpha,
                     dropout=self.lora.dropout, kernel_axes=axes, dtype=self.dtype,
                     param_dtype=self.param_dtype, name=name)


class MLP(_Sublayer):
  """SwiGLU: down(silu(gate(x)) * up(x)). x [B,T,D] -> [B,T,D]."""

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    dense = self._dense
    f, d = self.config.intermediate_size, self.config.hidden_size
    gate = dense("gate_proj", f, ("embed", "mlp"))(x, deterministic)
    up = dense("up_proj", f, ("embed", "mlp"))(x, deterministic)
    h = layers.constrain(nn.silu(gate) * up, layers.ACT_MLP)
    return dense("down_proj", d, ("mlp", "embed"))(h, deterministic)


class Attention(_Sublayer):
  """Grouped-query self-attention with RoPE, over the new tokens or a KV cache."""

  @nn.compact
  def __call__(self, x: Array, positions: Array, mask: Array,
               kv_cache: dict[str, Array] | None = None, deterministic: bool = True,
               return_attention: bool = False, read: Array | None = None):
    """x [B,T,D]; positions i32[B,T]; mask bool[B,T,S] (S = T without cache, else the
    cache length); kv_cache: one layer's cache (``cached_attention``), the new keys and
    values written at slot ``kv_cache['start']`` of each row; read: optional i32[B], with
    a cache only: the one position per row whose output is computed (keys and values
    are still written for all T).

    Returns (out [B,T,D] ([B,1,D] with read), new kv_cache {'k','v'} or None,
    probs f32[B,N,T,S] or None).
    """
    c = self.config
    n, kv, h = c.num_heads, c.num_kv_heads, c.head_dim
    dense = self._dense
    b, t, _ = x.shape
    k = dense("k_proj", kv * h, ("embed", "kv_heads"))(x, deterministic).reshape(b, t, kv, h)
    v = dense("v_proj", kv * h, ("embed", "kv_heads"))(x, deterministic).reshape(b, t, kv, h)
    inv_freq = layers.rope_inv_freq(h, c.rope_theta, c.rope_scaling_dict)
    k = layers.apply_rope(k, positions, inv_freq)
    if read is not None:
      x, positions, mask = (take_rows(a, read) for a in (x, positions, mask))
      t = 1
    q = dense("q_proj", n * h, ("embed", "heads"))(x, deterministic).reshape(b, t, n, h)
    q = layers.apply_rope(q, positions, inv_freq)
    if kv_cache is not None:
      out, kv_cache = cached_attention(q, k, v, mask, kv_cache, self.dtype)
      probs = None
    else:
      out, probs = layers.attention(q, k, v, mask, return_probs=return_attention,
                                    impl=self.attention)
    out = layers.constrain(out, layers.ACT_HEADS)
    out = dense("o_proj", c.hidden_size, ("heads", "embed"))(
        out.reshape(b, t, n * h), deterministic)
    return out, kv_cache, probs


class DecoderBlock(_Sublayer):
  """Pre-norm block: x + attn(norm(x)); x + mlp(norm(x)). Scan-shaped: returns
  (x, (kv_cache, attention probs))."""

  @nn.compact
  def __call__(self, x, positions, mask, kv_cache, deterministic, return_attention,
               read=None):
    """read: optional i32[B] (cached path only): only that position of each row goes
    past the keys and values (x [B,T,D] -> [B,1,D]), as for the last block when only
    one position per row is read."""
    c = self.config
    kw = dict(attention=self.attention)
    x = layers.constrain(x, layers.ACT_EMBED)
    h = RMSNorm(c.rms_norm_eps, self.param_dtype, name="input_layernorm")(x)
    h, kv_cache, probs = Attention(c, self.lora, self.dtype, self.param_dtype, **kw,
                                   name="self_attn")(
        h.astype(self.dtype), positions, mask, kv_cache, deterministic, return_attention,
        read)
    if read is not None:
      x = take_rows(x, read)
    x = x + h
    h = RMSNorm(c.rms_norm_eps, self.param_dtype, name="post_attention_layernorm")(x)
    x = x + MLP(c, self.lora, self.dtype, self.param_dtype, **kw, name="mlp")(
        h.astype(self.dtype), deterministic)
    return layers.constrain(x, layers.ACT_EMBED), (kv_cache, probs)


class Embedder(nn.Module):
  """Token embedding table ``embedding [V,D]``; ``decode`` is the tied output layer.

  With ``new_rows`` = N > 0 the table is ``embedding [V-N,D]`` (the checkpoint's rows) and
  ``new_embedding [N,D]`` (added tokens, ids V-N..V-1): two leaves, so the new rows can be
  trained while the checkpoint's stay frozen (``lora.NEW_ROW_LEAVES``).
  """
  vocab_size: int
  features: int
  param_dtype: DType = jnp.float32
  new_rows: int = 0

  def setup(self):
    init = logical_init(nn.initializers.normal(0.02), ("vocab", "embed"))
    self.embedding = self.param("embedding", init, (self.vocab_size - self.new_rows,
                                                    self.features), self.param_dtype)
    if self.new_rows:
      self.new_embedding = self.param("new_embedding", init, (self.new_rows, self.features),
                                      self.param_dtype)

  def encode(self, tokens: Array) -> Array:
    """tokens i32[B,T] -> [B,T,D] (param dtype); an id past the table reads NaN."""
    if not self.new_rows:
      return jnp.take(self.embedding, tokens, axis=0)
    base = self.vocab_size - self.new_rows
    added = tokens >= base
    old = jnp.take(self.embedding, jnp.where(added, 0, tokens), axis=0)
    new = jnp.take(self.new_embedding, jnp.where(added, tokens - base, 0), axis=0)
    return jnp.where(added[..., None], new, old)

  def decode(self, x: Array) -> Array:
    """x [B,T,D] -> logits f32[B,T,V]."""
    logits = jnp.einsum("BTD,VD->BTV", x, self.embedding.astype(x.dtype),
                        preferred_element_type=jnp.float32)
    if not self.new_rows:
      return logits
    return jnp.concatenate([logits, jnp.einsum(
        "BTD,ND->BTN", x, self.new_embedding.astype(x.dtype),
        preferred_element_type=jnp.float32)], axis=-1)


def causal_mask(input_mask: Array) -> Array:
  """bool[B,T] (True = real token) -> bool[B,T,T]: query t sees keys s <= t that are real."""
  t = input_mask.shape[1]
  return jnp.tril(jnp.ones((t, t), bool))[None] & input_mask[:, None, :]


def cache_mask(end: Array, t: int, s: int) -> Array:
  """Mask bool[B,T,S] for T new tokens written at end[b] + arange(T) into a cache of
  length S: query t sees every slot up to and including its own position."""
  query_pos = end[:, None] + jnp.arange(t)[None]
  return jnp.arange(s)[None, None, :] <= query_pos[:, :, None]


def take_rows(x: Array, index: Array) -> Array:
  """x [B,T,...] at one position per row, index i32[B] -> [B,1,...]."""
  index = index.astype(jnp.int32).reshape((-1, 1) + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


class Llama(nn.Module):
  """Llama causal LM. See the module docstring for param names and entry points.

  Attributes:
    config: LlamaConfig (or config.model.llm, converted).
    lora: LoraSpec for this tower (targets like 'q_proj', 'v_proj').
    dtype: compute dtype; param_dtype: storage dtype.
    scan_layers: stack the blocks under nn.scan; remat_policy: jax.checkpoint_policies name.
    attention: layers.ATTENTION_IMPLS name.
    unroll_layers: with scan_layers, run the stacked blocks unrolled
      (``layers.scan_blocks``); the params are the same.
  """
  config: LlamaConfig
  lora: LoraSpec = LoraSpec()
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32
  scan_layers: bool = True
  remat_policy: str = "none"
  attention: str = "einsum"
  unroll_layers: bool = False

  def setup(self):
    c = self.config
    self.embed_tokens = Embedder(c.vocab_size, c.hidden_size, self.param_dtype,
                                 new_rows=c.new_tokens)
    # deterministic (5) and return_attention (6) are Python bools: static under remat.
    block = layers.maybe_remat(DecoderBlock, self.remat_policy, static_argnums=(5, 6),
                               prevent_cse=not self.scan_layers)
    args = (c, self.lora, self.dtype, self.param_dtype, self.attention)
    if self.scan_layers:
      scanned = layers.scan_blocks(
          block, c.num_layers,
          in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast, nn.broadcast),
          unroll=self.unroll_layers)
      self.layers = scanned(*args)
    else:
      self.layers = [block(*args) for _ in range(c.num_layers)]
    self.norm = RMSNorm(c.rms_norm_eps, self.param_dtype)
    if not c.tie_word_embeddings:
      self.lm_head = LoraDense(c.base_vocab_size, kernel_axes=("embed", "vocab"),
                               dtype=self.dtype, param_dtype=self.param_dtype)
      if c.new_tokens:   # the output columns of the added tokens: [D, N]
        self.new_lm_head = self.param(
            "new_lm_head", logical_init(nn.initializers.normal(0.02), ("embed", "vocab")),
            (c.hidden_size, c.new_tokens), self.param_dtype)

  def embed(self, tokens: Array) -> Array:
    """tokens i32[B,T] -> embeddings [B,T,D] in the compute dtype."""
    return self.embed_tokens.encode(tokens).astype(self.dtype)

  def _blocks(self, x, positions, mask, deterministic, return_attention):
    """Runs all blocks over a whole sequence (no cache; the cached path is
    ``_extend_blocks``). Returns (x, probs f32[L,B,N,T,S] or None)."""
    if self.scan_layers:
      x, (_, probs) = self.layers(x, positions, mask, None, deterministic, return_attention)
      return x, probs
    all_probs = []
    for block in self.layers:
      x, (_, probs) = block(x, positions, mask, None, deterministic, return_attention)
      all_probs.append(probs)
    return x, (jnp.stack(all_probs) if return_attention else None)

  def logits(self, x: Array) -> Array:
    """Final norm and output layer: x [B,T,D] -> f32[B,T,V]."""
    x = self.norm(x).astype(self.dtype)
    if self.config.tie_word_embeddings:
      return self.embed_tokens.decode(x)
    logits = self.lm_head(x).astype(jnp.float32)
    if not self.config.new_tokens:
      return logits
    return jnp.concatenate([logits, jnp.einsum(
        "BTD,DN->BTN", x, self.new_lm_head.astype(x.dtype),
        preferred_element_type=jnp.float32)], axis=-1)

  def hidden(self, embeds: Array, input_mask: Array, deterministic: bool = True) -> Array:
    """The last block's output [B,T,D] (before the final norm) for teacher-forced
    embeds [B,T,D]; ``logits(hidden(...))`` equals ``__call__``'s logits."""
    b, t = embeds.shape[:2]
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x, _ = self._blocks(embeds.astype(self.dtype), positions, causal_mask(input_mask),
                        deterministic, False)
    return x

  def __call__(self, tokens: Array | None = None, input_mask: Array | None = None, *,
               embeds: Array | None = None, deterministic: bool = True,
               return_attention: bool = False):
    """Teacher-forced logits.

    Args:
      tokens: i32[B,T] (or None when ``embeds`` [B,T,D] is given).
      input_mask: bool[B,T], True on real tokens (right padding); None = all real.
      return_attention: also return the attention probabilities f32[L,B,N,T,T].

    Returns:
      logits f32[B,T,V], or (logits, probs) when return_attention.
    """
    x = self.embed(tokens) if embeds is None else embeds.astype(self.dtype)
    b, t = x.shape[:2]
    if input_mask is None:
      input_mask = jnp.ones((b, t), bool)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x, probs = self._blocks(x, positions, causal_mask(input_mask), deterministic,
                            return_attention)
    logits = self.logits(x)
    return (logits, probs) if return_attention else logits

  def extend(self, tokens: Array | None, input_mask: Array, cache: Cache, *,
             embeds: Array | None = None) -> tuple[Array, Cache]:
    """Appends T tokens per row to the cache and returns their logits.

    Args:
      tokens: i32[B,T] (or None when ``embeds`` [B,T,D] is given).
      input_mask: bool[B,T]; rows are right-padded (True then False).
      cache: ``init_cache`` / ``with_prefix`` layout; needs S >= end + T.

    Returns:
      (logits f32[B,T,V], cache with the new keys/values and end += sum(input_mask)).
      Padding slots are written beyond the new end and overwritten by the next call.
    """
    x = self.embed(tokens) if embeds is None else embeds.astype(self.dtype)
    x, cache = self._extend_blocks(x, input_mask, cache)
    return self.logits(x), cache

  def extend_hidden(self, input_mask: Array, cache: Cache, embeds: Array,
                    read: Array | None = None) -> tuple[Array, Cache]:
    """``extend`` returning the last block's output [B,T,D] (before the final norm)
    instead of logits; ``logits(hidden)`` gives ``extend``'s logits.

    read: optional i32[B], the one position per row that is read (e.g. each prompt's
    last token): the output is then [B,1,D], that position's, and the last block
    computes only the keys and values of the other positions (no query, attention
    or MLP rows that nobody reads).
    """
    return self._extend_blocks(embeds.astype(self.dtype), input_mask, cache, read)

  def _layer_params(self, i: int) -> Any:
    """Block i's params (a slice of the stacked ones under ``scan_layers``)."""
    params = self.variables["params"]
    if self.scan_layers:
      return jax.tree.map(lambda a: a[i], params["layers"])
    return params[f"layers_{i}"]

  def _extend_blocks(self, x: Array, input_mask: Array, cache: Cache,
                     read: Array | None = None) -> tuple[Array, Cache]:
    """The blocks over x [B,T,D] written into the cache at each row's end: (the last
    block's output [B,T,D] (at ``read`` only: [B,1,D], see ``extend_hidden``), the
    cache with the new keys/values and end += sum(input_mask)).

    The layers run unrolled, each on its own cache buffers (updated in place inside a
    decode loop); under ``scan_layers`` block i reads its slice of the stacked params
    (``kptjax.inference.decode`` unstacks them once, outside its loop).
    """
    c = self.config
    t = x.shape[1]
    end = cache["end"].astype(jnp.int32)
    prefix = cache.get("prefix")
    offset = end
    if prefix is not None:
      offset = end + jnp.repeat(prefix["end"], end.shape[0] // prefix["end"].shape[0])
    positions = offset[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
    mask = cache_mask(end, t, cache["k"][0].shape[2])
    block = DecoderBlock(c, self.lora, self.dtype, self.param_dtype, parent=None)
    new_k, new_v = [], []
    for i in range(c.num_layers):
      layer = {"k": cache["k"][i], "v": cache["v"][i], "start": end}
      if prefix is not None:
        sp = prefix["k"][i].shape[2]
        layer.update(prefix_k=prefix["k"][i], prefix_v=prefix["v"][i],
                     prefix_mask=jnp.arange(sp)[None] < prefix["end"][:, None])
      last = read if i == c.num_layers - 1 else None
      x, (layer, _) = block.apply({"params": self._layer_params(i)}, x, positions, mask,
                                  layer, True, False, last)
      new_k.append(layer["k"])
      new_v.append(layer["v"])
    out = {"k": tuple(new_k), "v": tuple(new_v),
           "end": end + jnp.sum(input_mask, axis=1, dtype=jnp.int32)}
    if prefix is not None:
      out["prefix"] = prefix
    return x, out


def cached_attention(q: Array, k: Array, v: Array, mask: Array, cache: dict[str, Array],
                     dtype: DType) -> tuple[Array, dict[str, Array]]:
  """Attention of T new tokens over one layer's cache, after writing their keys/values.

  Args:
    q: [B,T,N,H] (RoPE applied); k, v: [B,T',K,H] the new tokens' keys/values
      (T' = T, or T = 1 when only one position per row is read).
    mask: bool[B,T,S] over the rows' own slots.
    cache: {'k','v': [B,K,S,H], 'start': i32[B] the slot of the first new token} and
      optionally the shared prefix {'prefix_k','prefix_v': [P,K,Sp,H],
      'prefix_mask': bool[P,Sp]}, B = P * Q rows person-major.
    dtype: compute dtype.

  Returns:
    (out [B,T,N,H] in dtype, {'k','v'} the updated buffers).

  With a prefix the softmax runs over [prefix slots, own slots] in two parts that share
  one max and one normalizer: exactly the softmax over the concatenation, while the
  prefix is read once per person (a [Q*T*G, H] x [H, Sp] matmul per person and kv
  head) and never copied per row.

  Every einsum asks for its dot's natural layout (batch dims, then the lhs' free dims,
  then the rhs'), so the [.., T, S] scores are never transposed; only q and the output
  ([B,T,N,H]-sized) change layout.
  """
  write = jax.vmap(lambda buf, new, start: jax.lax.dynamic_update_slice(
      buf, new.transpose(1, 0, 2).astype(buf.dtype), (0, start, 0)))
  kc, vc = write(cache["k"], k, cache["start"]), write(cache["v"], v, cache["start"])
  b, t, n, h = q.shape
  kv = k.shape[2]
  g = n // kv
  scale = h ** -0.5
  neg = jnp.finfo(jnp.float32).min
  q = q.reshape(b, t, kv, g, h)
  own = jnp.einsum("BTKGH,BKSH->BKTGS", q, kc.astype(dtype),
                   preferred_element_type=jnp.float32) * scale
  own = jnp.where(mask[:, None, :, None], own, neg)
  if "prefix_k" not in cache:
    probs = jax.nn.softmax(own, axis=-1)
    out = jnp.einsum("BKTGS,BKSH->BKTGH", probs.astype(dtype), vc.astype(dtype))
    return out.transpose(0, 2, 1, 3, 4).reshape(b, t, n, h), {"k": kc, "v": vc}
  pk, pv = cache["prefix_k"].astype(dtype), cache["prefix_v"].astype(dtype)
  p = pk.shape[0]
  rq = b // p
  pre = jnp.einsum("PQTKGH,PKSH->PKQTGS", q.reshape(p, rq, t, kv, g, h), pk,
                   preferred_element_type=jnp.float32) * scale
  pre = jnp.where(cache["prefix_mask"][:, None, None, None, None, :], pre, neg)
  own = own.reshape(p, rq, kv, t, g, own.shape[-1])                 # [P,Q,K,T,G,S]
  to_own = (0, 2, 1, 3, 4)                                          # [P,K,Q,T,G] <-> [P,Q,K,T,G]
  top = jnp.maximum(jnp.max(pre, axis=-1).transpose(to_own), jnp.max(own, axis=-1))
  e_pre = jnp.exp(pre - top.transpose(to_own)[..., None])
  e_own = jnp.exp(own - top[..., None])
  total = jnp.sum(e_pre, axis=-1).transpose(to_own) + jnp.sum(e_own, axis=-1)
  out_pre = jnp.einsum("PKQTGS,PKSH->PKQTGH", e_pre.astype(dtype), pv,
                       preferred_element_type=jnp.float32)
  out_own = jnp.einsum("PQKTGS,PQKSH->PQKTGH", e_own.astype(dtype),
                       vc.astype(dtype).reshape(p, rq, *vc.shape[1:]),
                       preferred_element_type=jnp.float32)
  out = (out_pre.transpose(0, 2, 3, 1, 4, 5) + out_own.transpose(0, 1, 3, 2, 4, 5)
         ) / total.transpose(0, 1, 3, 2, 4)[..., None]               # [P,Q,T,K,G,H]
  return out.astype(dtype).reshape(b, t, n, h), {"k": kc, "v": vc}


def init_cache(llm_config: Any, batch: int, max_len: int, dtype: DType = jnp.float32) -> Cache:
  """Empty KV cache {'k','v': L x zeros [B,K,S,H], 'end': zeros i32[B]} (S = max_len)."""
  c = LlamaConfig.from_config(llm_config)
  shape = (batch, c.num_kv_heads, max_len, c.head_dim)
  dtype = layers.to_dtype(dtype)
  return {"k": tuple(jnp.zeros(shape, dtype) for _ in range(c.num_layers)),
          "v": tuple(jnp.zeros(shape, dtype) for _ in range(c.num_layers)),
          "end": jnp.zeros((batch,), jnp.int32)}


def with_prefix(prefix: Cache, rows_per_prefix: int, max_len: int) -> Cache:
  """A cache of P * Q rows (Q = rows_per_prefix, person-major) that share the filled
  ``prefix`` cache of P rows (stored once, read by every row of its person) and each
  own an empty suffix of ``max_len`` slots."""
  if "prefix" in prefix:
    raise ConfigError("with_prefix: the cache already has a prefix")
  p, kv, _, h = prefix["k"][0].shape
  shape = (p * rows_per_prefix, kv, max_len, h)
  return {"k": tuple(jnp.zeros(shape, x.dtype) for x in prefix["k"]),
          "v": tuple(jnp.zeros(shape, x.dtype) for x in prefix["v"]),
          "end": jnp.zeros((p * rows_per_prefix,), jnp.int32),
          "prefix": {"k": prefix["k"], "v": prefix["v"], "end": prefix["end"]}}


# Logical axes of one layer's cache buffer (every leaf of 'k' / 'v' and of the prefix's),
# and of the 'end' counters, for sharding.
CACHE_AXES: Mapping[str, tuple[str, ...]] = {
    "k": ("batch", "kv_heads", "cache_length", "head_dim"),
    "v": ("batch", "kv_heads", "cache_length", "head_dim"),
    "end": ("batch",),
}
