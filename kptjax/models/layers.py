"""Building blocks shared by both towers: dtype policy, logical axes, the dense matmul,
RMSNorm, RoPE, attention, remat and scan helpers.

Axis letters used in einsum equations across kptjax.models:
  B batch, T query length, S key length (cache length), D model width,
  N query heads, K key/value heads, G query heads per kv head (N = K * G),
  H head dim, F mlp width, V vocab, R LoRA rank.

Logical axis names (mapped to mesh axes by configs/common.py LOGICAL_AXIS_RULES):
  batch, embed, vit_embed, mlp, heads, kv_heads, head_dim, vocab, layers, lora_rank,
  patch, length, cache_length.
Activations carry the same names through ``constrain`` at block boundaries
(``ACT_*`` below): the batch dimension takes ('data', 'fsdp') first, so the hidden
dimension of an activation is never split over 'fsdp' (the rules are applied in table
order and a mesh axis is used once per array); under FSDP the weights are gathered per
layer instead (ZeRO-3).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kptjax import sharding
from kptjax.errors import ConfigError

Array = jax.Array
DType = Any
Initializer = Callable[..., Array]

# Default weight init of the HF Llama / DINOv2 configs (initializer_range = 0.02).
default_kernel_init = nn.initializers.normal(stddev=0.02)


# --------------------------------------------------------------------------- dtypes
def to_dtype(name: str | DType | None, default: DType = jnp.float32) -> jnp.dtype:
  """'bfloat16' / 'float32' / a dtype / None (-> default) as a jnp dtype."""
  if name is None or name == "":
    return jnp.dtype(default)
  try:
    return jnp.dtype(name)
  except TypeError as e:
    raise ConfigError(f"unknown dtype {name!r} (expected e.g. 'float32', 'bfloat16')") from e


# ---------------------------------------------------------------------- logical axes
def logical_init(init: Initializer, axes: Sequence[str | None]) -> Initializer:
  """Wraps an initializer so its param carries logical axis names (one per dim)."""
  return nn.with_logical_partitioning(init, tuple(axes))


# Logical names of the activations that cross block boundaries.
ACT_EMBED = ("batch", "length", "embed")          # residual stream [B,T,D]
ACT_VIT_EMBED = ("batch", "length", "vit_embed")  # ViT residual stream [B,T,D]
ACT_MLP = ("batch", "length", "mlp")              # MLP hidden [B,T,F]
ACT_HEADS = ("batch", "length", "heads", None)    # per-head q/k/v/out [B,T,N,H]


def constrain(x: Array, names: Sequence[str | None]) -> Array:
  """``with_sharding_constraint`` of x by logical names, under the active rules
  (``nn.logical_axis_rules``) and mesh (``jax.set_mesh`` / ``use_abstract_mesh``).

  A no-op without rules or outside a mesh of more than one device (plain
  ``model.apply``, decoding on one device). Mesh axes that do not divide a dimension
  are dropped for it (``sharding.fit_spec``), so tiny shapes stay legal.
  """
  rules = nn.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or not mesh.shape or math.prod(mesh.shape.values()) == 1:
    return x
  spec = sharding.fit_spec(sharding.logical_to_mesh_spec(names, rules), x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, spec)


# ------------------------------------------------------------------------- matmul
@jax.custom_vjp
def matmul(x: Array, kernel: Array) -> Array:
  """``x [..., I] @ kernel [I, O] -> [..., O]``: every dense projection of both towers.

  Its value and gradients are the einsum's. Only the weight gradient's dot is written
  differently: JAX's own rule computes it as ``dy^T @ x`` and transposes the result, so
  XLA's CPU dots (row-major operands only) materialize ``dy`` transposed, with the
  elementwise backward before it (SiLU's, in the MLP) fused into that transpose and run
  unvectorized. Here the smaller of ``x`` and ``dy`` is the transposed operand, and the
  other one is read in place (README, "What the demo does").
  """
  return jnp.einsum("...i,io->...o", x, kernel)


def _matmul_fwd(x: Array, kernel: Array):
  return matmul(x, kernel), (x, kernel)


def weight_gradient(x: Array, dy: Array) -> Array:
  """``sum over all leading dims of x[..., I, None] * dy[..., None, O]`` -> [I, O], as one
  dot whose transposed operand is the smaller of x and dy."""
  lead = tuple(range(x.ndim - 1))
  contract = ((lead, lead), ((), ()))
  if x.shape[-1] <= dy.shape[-1]:
    return jax.lax.dot_general(x, dy, contract)
  return jax.lax.dot_general(dy, x, contract).T


def _matmul_bwd(residuals, dy: Array):
  x, kernel = residuals
  return jnp.einsum("...o,io->...i", dy, kernel), weight_gradient(x, dy)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


# --------------------------------------------------------------------------- RMSNorm
class RMSNorm(nn.Module):
  """Llama RMSNorm, computed in float32: y = x / sqrt(mean(x^2) + eps) * scale.

  Input [..., D] any float dtype; output float32 [..., D]. Param ``scale [D]`` (ones).
  """
  eps: float = 1e-6
  param_dtype: DType = jnp.float32
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", logical_init(nn.initializers.ones, (self.axis_name,)),
                       (x.shape[-1],), self.param_dtype)
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    return x * scale.astype(jnp.float32)


# -------------------------------------------------------------------- rotary (RoPE)
def rope_inv_freq(head_dim: int, theta: float, rope_scaling: dict | None = None) -> np.ndarray:
  """Inverse frequencies f32[head_dim // 2] as transformers computes them.

  rope_scaling: None or {'rope_type': 'default' | 'llama3', 'factor', 'low_freq_factor',
  'high_freq_factor', 'original_max_position_embeddings'} (Llama-3.1's config.json names).
  """
  exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
  inv_freq = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
  rope_type = (rope_scaling or {}).get("rope_type", "default")
  if rope_type == "default":
    return inv_freq
  if rope_type != "llama3":
    raise ConfigError(f"rope_scaling.rope_type={rope_type!r} (expected 'default' or 'llama3')")
  factor = float(rope_scaling["factor"])
  low = float(rope_scaling["low_freq_factor"])
  high = float(rope_scaling["high_freq_factor"])
  old_len = float(rope_scaling["original_max_position_embeddings"])
  low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: Array, positions: Array, inv_freq: Array | np.ndarray) -> Array:
  """Rotates x [B,T,N,H] at integer positions [B,T] (HF 'rotate_half' layout).

  Angles are computed in float32; the result has x's dtype.
  """
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]   # [B,T,1,H]
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x * cos + rotated * sin


# ------------------------------------------------------------------------- attention
# model.attention: how attention is computed when the probabilities are not asked for.
#   'einsum'  the explicit einsums below (stores the f32[B,N,T,S] probabilities for
#             backward);
#   'xla'     jax.nn.dot_product_attention's XLA implementation (the CPU path);
#   'cudnn'   jax.nn.dot_product_attention's cuDNN flash kernel (GPU; scores are never
#             stored for backward);
#   'recompute'  the einsums under jax.checkpoint: exact, and the backward pass recomputes
#             the probabilities from q and k instead of storing f32[B,N,T,S] (one more
#             q.k matmul; the CPU path that stores no scores);
#   'folded'  ``folded_attention``: (batch, kv head) folded into one batch dimension, the
#             softmax normalized after the value matmul (a CPU layout; same values).
ATTENTION_IMPLS = ("einsum", "xla", "cudnn", "recompute", "folded")


def folded_attention(q: Array, k: Array, v: Array, mask: Array | None) -> Array:
  """``attention``'s value with batch and kv heads folded into one batch dimension.

  The queries of a kv head's group are stacked along the length, so both matmuls are
  plain batched dots over ``B*K`` of ``[G*T, H] x [H, S]`` and ``[G*T, S] x [S, H]``;
  the exponentials are divided by their sum after the value matmul (over ``[.., H]``,
  not ``[.., S]``). The max is subtracted under ``stop_gradient`` (softmax does not
  depend on it). A CPU layout: ``experiments/bench_train.py`` times the step with it
  against the 'xla' path (README, "Training memory and speed").

  Args: as ``attention`` (q [B,T,N,H]; k, v [B,S,K,H]; mask [B,T,S] bool or None).
  Returns: [B,T,N,H] in v's dtype.
  """
  b, t, n, h = q.shape
  s, kv = k.shape[1], k.shape[2]
  g = n // kv
  qf = q.reshape(b, t, kv, g, h).transpose(0, 2, 3, 1, 4).reshape(b * kv, g * t, h)
  kf, vf = (x.transpose(0, 2, 1, 3).reshape(b * kv, s, h) for x in (k, v))
  batch_dot = lambda x, y, cx, cy: jax.lax.dot_general(
      x, y, (((cx,), (cy,)), ((0,), (0,))), preferred_element_type=jnp.float32)
  logits = batch_dot(qf, kf, 2, 2) * (h ** -0.5)                    # [B*K, G*T, S]
  if mask is not None:
    mask = jnp.broadcast_to(mask[:, None, None], (b, kv, g, t, s)).reshape(b * kv, g * t, s)
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  e = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
  out = batch_dot(e.astype(v.dtype), vf, 2, 1) / jnp.sum(e, axis=-1, keepdims=True)
  return out.reshape(b, kv, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(v.dtype)


def attention(q: Array, k: Array, v: Array, mask: Array | None = None, *,
              return_probs: bool = False, impl: str = "einsum"
              ) -> tuple[Array, Array | None]:
  """Scaled dot-product attention with grouped-query heads.

  Args:
    q: [B,T,N,H] queries; k, v: [B,S,K,H] keys/values with N % K == 0.
    mask: bool, broadcastable to [B,T,S] (True = may attend), or None (attend to all).
    return_probs: also return the probabilities f32[B,N,T,S] (always by the einsums).
    impl: one of ATTENTION_IMPLS.

  Returns:
    (out [B,T,N,H] in v's dtype, probs or None). Logits and softmax are float32.
  """
  if impl not in ATTENTION_IMPLS:
    raise ConfigError(f"model.attention={impl!r} (expected one of {ATTENTION_IMPLS})")
  b, t, n, h = q.shape
  kv = k.shape[2]
  if mask is not None:
    mask = jnp.broadcast_to(mask, (b, t, k.shape[1]))
  if impl == "recompute" and not return_probs:
    core = jax.checkpoint(lambda q, k, v, mask: attention(q, k, v, mask)[0])
    return core(q, k, v, mask), None
  if impl == "folded" and not return_probs:
    return folded_attention(q, k, v, mask), None
  if impl in ("xla", "cudnn") and not return_probs:
    out = jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else mask[:, None],
                                       implementation=impl)
    return out.astype(v.dtype), None
  q = q.reshape(b, t, kv, n // kv, h)
  logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k,
                      preferred_element_type=jnp.float32) * (h ** -0.5)
  if mask is not None:
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(v.dtype), v).reshape(b, t, n, h)
  return out, (probs.reshape(b, n, t, -1) if return_probs else None)


# ---------------------------------------------------------------------- remat / scan
def remat_policy(name: str | None) -> Callable[..., bool] | None:
  """A ``jax.checkpoint_policies`` policy by name; None for 'none' / '' (no remat).

  'full' is an alias of 'nothing_saveable' (recompute everything).
  """
  if name in (None, "", "none"):
    return None
  if name == "full":
    name = "nothing_saveable"
  policy = getattr(jax.checkpoint_policies, name, None)
  if policy is None:
    raise ConfigError(f"model.remat_policy={name!r}: not a jax.checkpoint_policies name")
  return policy


def maybe_remat(block_cls: type[nn.Module], policy_name: str | None, *,
                static_argnums: tuple[int, ...] = (), prevent_cse: bool = True):
  """``nn.remat(block_cls)`` with the named policy, or block_cls when policy is 'none'.

  static_argnums count ``self`` as 0 (flax convention).
  """
  if policy_name in (None, "", "none"):
    return block_cls
  return nn.remat(block_cls, policy=remat_policy(policy_name),
                  static_argnums=static_argnums, prevent_cse=prevent_cse)


def scan_blocks(block_cls: type[nn.Module], num_layers: int, in_axes: Any,
                unroll: bool = False):
  """``nn.scan`` over ``num_layers`` copies of block_cls, params stacked on axis 0
  (logical name 'layers'). The block must return ``(carry, per_layer_output)``.

  ``unroll`` (``config.model.unroll_layers``) traces the blocks as straight-line code
  (``lax.scan``'s ``unroll = num_layers``) with the same stacked params: no loop, so
  no [L, ...] buffers of saved activations to zero-fill, write and slice in the
  backward pass; compile time grows with num_layers.
  """
  return nn.scan(block_cls,
                 variable_axes={"params": 0},
                 split_rngs={"params": True, "dropout": True},
                 in_axes=in_axes,
                 length=num_layers,
                 unroll=num_layers if unroll else 1,
                 metadata_params={nn.PARTITION_NAME: "layers"})
