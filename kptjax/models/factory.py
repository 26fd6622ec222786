"""Which model a config builds: the one seam between a config and the model variant.

Variants (``config.model.kpt.enabled`` picks KptLLM, else the plain VLM):

* ``'vlm'``    LocLLM / PoseLLM / CapeLLM: ``kptjax.models.vlm.VLM``; train batch
  ``image f32[B,H,W,3], tokens i32[B,T], targets i32[B,T], loss_mask f32[B,T],
  input_mask bool[B,T]``.
* ``'kptllm'`` KptLLM: ``kptjax.models.kptllm.KptLLM`` (support prompts, ``<keypoint>``
  regression); the batch adds ``support_image f32[B,S,H,W,3], support_xy f32[B,S,R,2],
  support_mask f32[B,S,R], kpt_xy f32[B,R,2], kpt_mask f32[B,R]``.

No other module asks which paper a config is: it asks this one.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from kptjax import sharding
from kptjax.models import kptllm, vlm

BATCH_KEYS = ("image", "tokens", "targets", "loss_mask", "input_mask")
KPT_BATCH_KEYS = ("support_image", "support_xy", "support_mask", "kpt_xy", "kpt_mask")


def variant(config: ml_collections.ConfigDict) -> str:
  """``'kptllm'`` when ``config.model.kpt.enabled``, else ``'vlm'``."""
  kpt = config.model.get("kpt", None)
  return "kptllm" if kpt is not None and kpt.get("enabled", False) else "vlm"


def make_model(config: ml_collections.ConfigDict) -> nn.Module:
  """The Linen module of ``config.model`` (unbound, no params)."""
  return kptllm.KptLLM(config.model) if variant(config) == "kptllm" else vlm.VLM(config.model)


def init_kwargs(config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
  """Shape-only keyword inputs ``model.init`` needs beyond ``vlm.dummy_inputs``."""
  return kptllm.dummy_support(config.model) if variant(config) == "kptllm" else {}


def batch_keys(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The train-batch fields the step reads."""
  return BATCH_KEYS + (KPT_BATCH_KEYS if variant(config) == "kptllm" else ())


def batch_shapes(config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], Any]]:
  """``field -> (shape, dtype)`` of the global train batch."""
  b, t, side = config.train.batch_size, config.data.max_len, config.model.vit.image_size
  shapes = dict(image=((b, side, side, 3), jnp.float32), tokens=((b, t), jnp.int32),
                targets=((b, t), jnp.int32), loss_mask=((b, t), jnp.float32),
                input_mask=((b, t), jnp.bool_))
  if variant(config) == "kptllm":
    s, r = config.data.shots, config.data.rounds
    shapes.update(support_image=((b, s, side, side, 3), jnp.float32),
                  support_xy=((b, s, r, 2), jnp.float32), support_mask=((b, s, r), jnp.float32),
                  kpt_xy=((b, r, 2), jnp.float32), kpt_mask=((b, r), jnp.float32))
  return shapes


def abstract_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
                   ) -> dict[str, jax.ShapeDtypeStruct]:
  """The global train batch as sharded ShapeDtypeStructs (for AOT ``step.lower``)."""
  sh = sharding.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(s, d, sharding=sh) for k, (s, d) in batch_shapes(config).items()}
