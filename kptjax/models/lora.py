"""LoRA-capable dense layer and helpers on param trees (merge, count, trainable masks).

A LoRA layer computes ``y = x W (+ b) + dropout(x) A B * alpha / rank`` with
``A [in, r]`` random and ``B [r, out]`` zero at init, so a fresh adapter changes nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kptjax.errors import ConfigError
from kptjax.models.layers import (DType, default_kernel_init, logical_init,
                                  matmul)

Array = jax.Array

LORA_LEAVES = ("lora_a", "lora_b")
# Rows of tokens added to a checkpoint's vocabulary (``llama.Embedder``, ``Llama.new_lm_head``).
NEW_ROW_LEAVES = ("new_embedding", "new_lm_head")
TRAINABLE_MODES = ("all", "projector", "lora+projector", "lora+vit+projector")
# Top-level modules trained whenever the projector is: the projector and KptLLM's
# support-prompt modules and regression head (kptjax/models/kptllm.py).
TRAINED_MODULES = ("projector", "prompt_encoder", "prompt_extractor", "prompt_projector",
                   "keypoint_head")

# PEFT's lora_A init (kaiming_uniform with a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)).
lora_a_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """LoRA settings of one tower (hashable, so it can be a Linen attribute).

  rank 0 turns LoRA off; ``targets`` are the projection names that get adapters
  (e.g. ('q_proj', 'v_proj') in the LLM, ('query', 'value') in the ViT).
  """
  rank: int = 0
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = ()

  @classmethod
  def from_config(cls, lora: Any, tower: str) -> "LoraSpec":
    """From config.model.lora (ConfigDict/dict/None); tower is 'vit' or 'llm'."""
    if lora is None:
      return cls()
    if isinstance(lora, LoraSpec):
      return lora
    targets = lora[f"{tower}_targets"] if f"{tower}_targets" in lora else ()
    return cls(rank=int(lora["rank"]), alpha=float(lora["alpha"]),
               dropout=float(lora["dropout"]), targets=tuple(targets))

  def rank_for(self, name: str) -> int:
    """The LoRA rank of the projection called ``name`` (0 when not a target)."""
    return self.rank if name in self.targets else 0

  @property
  def scale(self) -> float:
    """alpha / rank (0 when LoRA is off): the factor merge_lora needs."""
    return self.alpha / self.rank if self.rank else 0.0


class LoraDense(nn.Module):
  """Dense layer over the last axis with an optional low-rank adapter.

  Params: ``kernel [in,out]``, ``bias [out]`` if use_bias, and when rank > 0
  ``lora_a [in,r]`` (random) and ``lora_b [r,out]`` (zeros). LoRA params are stored in
  ``lora_param_dtype`` (float32 by default: they are trained even when the frozen base
  weights are bf16).

  Attributes:
    features: output width.
    kernel_axes: logical names of (in, out).
    dtype: compute dtype; param_dtype: storage dtype of kernel and bias.
  """
  features: int
  use_bias: bool = False
  rank: int = 0
  alpha: float = 16.0
  dropout: float = 0.0
  kernel_axes: tuple[str | None, str | None] = ("embed", "mlp")
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32
  lora_param_dtype: DType = jnp.float32
  kernel_init: Callable[..., Array] = default_kernel_init

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    """x [..., in] -> [..., features] in ``dtype``. Dropout (rng 'dropout') on the LoRA input."""
    in_axis, out_axis = self.kernel_axes
    kernel = self.param("kernel", logical_init(self.kernel_init, (in_axis, out_axis)),
                        (x.shape[-1], self.features), self.param_dtype)
    x = x.astype(self.dtype)
    y = matmul(x, kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", logical_init(nn.initializers.zeros, (out_axis,)),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    if self.rank > 0:
      a = self.param("lora_a", logical_init(lora_a_init, (in_axis, "lora_rank")),
                     (x.shape[-1], self.rank), self.lora_param_dtype)
      b = self.param("lora_b", logical_init(nn.initializers.zeros, ("lora_rank", out_axis)),
                     (self.rank, self.features), self.lora_param_dtype)
      h = nn.Dropout(rate=self.dropout)(x, deterministic=deterministic)
      h = matmul(h, a.astype(self.dtype))
      y = y + matmul(h, b.astype(self.dtype)) * (self.alpha / self.rank)
    return y


# ------------------------------------------------------------------ param-tree helpers
def _to_dict(tree: Any) -> Any:
  if isinstance(tree, flax.core.FrozenDict):
    return flax.core.unfreeze(tree)
  return tree


def merge_lora(params: Mapping[str, Any], alpha_over_rank: float) -> dict:
  """Folds every adapter into its kernel: ``kernel += lora_a @ lora_b * alpha_over_rank``.

  Works on the scanned layout too (leading 'layers' axis). Returns a new tree without
  lora_* leaves; kernels keep their dtype (the sum is done in float32).
  """
  def merge(node):
    if not isinstance(node, Mapping):
      return node
    out = {k: merge(v) for k, v in node.items() if k not in LORA_LEAVES}
    if "lora_a" in node and "lora_b" in node:
      if "kernel" not in node:
        raise ConfigError("merge_lora: found lora_a/lora_b without a 'kernel' beside them")
      kernel = node["kernel"]
      delta = jnp.einsum("...ir,...ro->...io", jnp.asarray(node["lora_a"], jnp.float32),
                         jnp.asarray(node["lora_b"], jnp.float32)) * alpha_over_rank
      out["kernel"] = (jnp.asarray(kernel, jnp.float32) + delta).astype(kernel.dtype)
    return out
  return merge(_to_dict(params))


def count_params(params: Any, mask: Any = None) -> int:
  """Number of scalars in a param tree (arrays or ShapeDtypeStructs); with a bool
  mask tree of the same structure, only the leaves where the mask is True."""
  params = nn.meta.unbox(params)
  sizes = jax.tree_util.tree_map(lambda x: int(np.prod(x.shape)), params)
  if mask is None:
    return int(sum(jax.tree_util.tree_leaves(sizes)))
  return int(sum(s for s, m in zip(jax.tree_util.tree_leaves(sizes),
                                   jax.tree_util.tree_leaves(mask)) if m))


def _path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(p, "key", getattr(p, "name", p))) for p in path)


def trainable_mask(params: Any, mode: str) -> Any:
  """Bool tree (same structure as params): which leaves the optimizer updates.

  mode: 'all' | 'projector' (everything under a 'projector' key, and under KptLLM's
  prompt modules and keypoint head: ``TRAINED_MODULES``) |
  'lora+projector' (those plus every lora_a / lora_b leaf) |
  'lora+vit+projector' (those plus the whole ViT: KptLLM fine-tunes its visual encoder).
  The rows of tokens added to a checkpoint's vocabulary (``NEW_ROW_LEAVES``, e.g. LocLLM's
  location tokens) are trained in every mode but 'projector'.
  """
  if mode not in TRAINABLE_MODES:
    raise ConfigError(f"optim.trainable={mode!r} (expected one of {TRAINABLE_MODES})")

  def is_trainable(path, _):
    names = _path_names(path)
    if mode == "all":
      return True
    if "projector" in names or (names and names[0] in TRAINED_MODULES):
      return True
    if mode == "lora+vit+projector" and names and names[0] == "vit":
      return True
    return mode != "projector" and bool(names) and names[-1] in LORA_LEAVES + NEW_ROW_LEAVES

  return jax.tree_util.tree_map_with_path(
      is_trainable, params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
