"""Optimizer, learning-rate schedule, and the split of params into trainable and frozen.

Frozen params get no optimizer state and no gradient: the train step differentiates
only the trainable subtree (``split``), and the optimizer is built over that subtree.
Trainable modes (``config.optim.trainable``):
  all              every param (the tiny demo)
  projector        only the vision->text projector (stage 1)
  lora+projector   LoRA factors of both towers + the projector (stage 2, the papers)
  lora+vit+projector  the above + the whole ViT (KptLLM fine-tunes its visual encoder)
KptLLM's prompt modules and keypoint head train with the projector (lora.TRAINED_MODULES).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

from kptjax.errors import ConfigError
from kptjax.models import lora

Params = dict[str, Any]


def trainable_mask(params: Params, mode: str) -> Params:
  """A bool tree shaped like ``params``: True where the leaf is trained in ``mode``
  (one of ``lora.TRAINABLE_MODES``)."""
  return lora.trainable_mask(params, mode)


def split(params: Params, mask: Params) -> tuple[Params, Params]:
  """(trainable, frozen): two nested dicts holding the leaves where ``mask`` is True / False.

  Works on concrete arrays, tracers and ShapeDtypeStructs alike; ``merge`` undoes it.
  """
  flat = traverse_util.flatten_dict(params)
  flat_mask = traverse_util.flatten_dict(mask)
  if flat.keys() != flat_mask.keys():
    raise ValueError(f"mask and params differ: {set(flat) ^ set(flat_mask)}")
  trainable = {k: v for k, v in flat.items() if flat_mask[k]}
  frozen = {k: v for k, v in flat.items() if not flat_mask[k]}
  return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge(trainable: Params, frozen: Params) -> Params:
  """Inverse of ``split``."""
  flat = traverse_util.flatten_dict(frozen)
  flat.update(traverse_util.flatten_dict(trainable))
  return traverse_util.unflatten_dict(flat)


def count(tree: Any) -> int:
  """Number of scalars in a tree of arrays or shapes."""
  return int(sum(x.size for x in jax.tree.leaves(tree)))


def schedule(optim: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """Linear warmup over ``warmup_ratio * num_steps`` steps, then ``optim.schedule``:

  ``cosine`` down to ``end_lr_ratio * lr`` at ``num_steps``; ``constant``; ``wsd``
  (warmup-stable-decay): constant, then linear down to ``end_lr_ratio * lr`` over the
  last ``decay_ratio * num_steps`` steps.

  Returns:
    step (int) -> learning rate.
  """
  warmup = int(round(optim.warmup_ratio * num_steps))
  if optim.schedule == "wsd":
    decay = max(1, min(int(round(optim.decay_ratio * num_steps)), num_steps - warmup))
    stable_end = num_steps - decay
    return optax.join_schedules(
        [optax.linear_schedule(0.0, optim.lr, warmup), optax.constant_schedule(optim.lr),
         optax.linear_schedule(optim.lr, optim.lr * optim.end_lr_ratio, decay)],
        [warmup, stable_end])
  if optim.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim.lr, warmup_steps=warmup,
        decay_steps=max(num_steps, warmup + 1), end_value=optim.lr * optim.end_lr_ratio)
  if optim.schedule == "constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, optim.lr, warmup), optax.constant_schedule(optim.lr)],
        [warmup])
  raise ConfigError(f"optim.schedule={optim.schedule!r}; expected 'cosine', 'constant' or 'wsd'")


def _decay_mask(params: Params) -> Params:
  """Weight decay on matrices (and LoRA factors), not on biases, norms or scales."""
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(optim: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
  """Global-norm clipping (if ``clip_norm > 0``) followed by AdamW with ``schedule``.

  Build and apply it over the trainable subtree only (see ``split``). Gradient
  accumulation is done by the train step (exact over micro-batches), not here.
  """
  if optim.name != "adamw":
    raise ConfigError(f"optim.name={optim.name!r}; only 'adamw' is implemented")
  parts = []
  if optim.clip_norm and optim.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim.clip_norm))
  parts.append(optax.adamw(schedule(optim, num_steps), b1=optim.b1, b2=optim.b2,
                           weight_decay=optim.weight_decay, mask=_decay_mask))
  return optax.chain(*parts)


def global_norm(tree: Any) -> jax.Array:
  """sqrt(sum of squares) over all leaves, in float32."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))
