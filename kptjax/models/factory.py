"""Which model a config builds: the one seam between a config and the model variant.

Variants (``config.model.kpt.enabled`` picks KptLLM, else the plain VLM):

* ``'vlm'``    LocLLM / PoseLLM / CapeLLM: ``kptjax.models.vlm.VLM``; train batch
  ``image f32[B,H,W,3], tokens i32[B,T], targets i32[B,T], loss_mask f32[B,T],
  input_mask bool[B,T]``; loss: the LM cross-entropy on answer tokens.
* ``'kptllm'`` KptLLM: ``kptjax.models.kptllm.KptLLM`` (support prompts, ``<keypoint>``
  regression); the batch adds ``support_image f32[B,S,H,W,3], support_xy f32[B,S,R,2],
  support_mask f32[B,S,R], kpt_xy f32[B,R,2], kpt_mask f32[B,R]``; loss: LM +
  ``optim.l1_weight`` x L1 of the regressed (x, y).

``variant_of(config)`` says it all in one ``Variant`` (model, batch fields, forward pass,
loss terms); the functions below it are its fields for callers that need one;
``tokenizer(config)`` is the tokenizer the model's vocabulary goes with. No other module
asks which paper a config is: it asks this one.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from kptjax import sharding
from kptjax.data import tokenizer as tokenizer_lib
from kptjax.models import kptllm, vlm
from kptjax.training import losses

BATCH_KEYS = ("image", "tokens", "targets", "loss_mask", "input_mask")
KPT_BATCH_KEYS = ("support_image", "support_xy", "support_mask", "kpt_xy", "kpt_mask")


def _vlm_forward(model: nn.Module, params: Any, batch: Mapping[str, jax.Array],
                 **kwargs) -> dict[str, jax.Array]:
  """VLM: {'hidden': the last block's output [B,T,D]}."""
  hidden = model.apply({"params": params}, batch["image"], batch["tokens"],
                       batch["input_mask"], return_hidden=True, **kwargs)
  return dict(hidden=hidden)


def _kptllm_forward(model: nn.Module, params: Any, batch: Mapping[str, jax.Array],
                    **kwargs) -> dict[str, jax.Array]:
  """KptLLM: {'hidden': [B,T,D], 'xy': the <keypoint> regression f32[B,R,2]}."""
  hidden, xy = model.apply(
      {"params": params}, batch["image"], batch["tokens"], batch["input_mask"],
      support_images=batch["support_image"], support_xy=batch["support_xy"],
      support_mask=batch["support_mask"], num_keypoint_slots=batch["kpt_xy"].shape[1],
      return_hidden=True, **kwargs)
  return dict(hidden=hidden, xy=xy)


@dataclasses.dataclass(frozen=True)
class Variant:
  """What a config's model variant is, for the trainer, the step and the loaders.

  Attributes:
    name: 'vlm' | 'kptllm'.
    model: the Linen module of ``config.model`` (unbound, no params).
    batch_keys: the train-batch fields the step reads.
    init_kwargs: ``() -> {name: array}``, the shape-only keyword inputs ``model.init``
      needs beyond ``vlm.dummy_inputs`` (made when called, e.g. inside a trace).
    forward: ``(model, params, batch, **apply_kwargs) -> {'hidden': [B,T,D], ...}`` (the
      train step's forward pass, ``kptjax.training.step.make_train_step``).
    loss_terms: ``kptjax.training.losses.LossTerm``s summed into the loss.
  """
  name: str
  model: nn.Module
  batch_keys: tuple[str, ...]
  init_kwargs: Callable[[], dict[str, jax.Array]]
  forward: Callable[..., dict[str, jax.Array]]
  loss_terms: tuple[losses.LossTerm, ...]


def variant(config: ml_collections.ConfigDict) -> str:
  """``'kptllm'`` when ``config.model.kpt.enabled``, else ``'vlm'``."""
  return _model_variant(config.model)


def _model_variant(model_config: ml_collections.ConfigDict) -> str:
  kpt = model_config.get("kpt", None)
  return "kptllm" if kpt is not None and kpt.get("enabled", False) else "vlm"


def abstract_params(model_config: ml_collections.ConfigDict, *, boxed: bool = True) -> Any:
  """ShapeDtypeStructs of the variant's params (KptLLM's prompt modules and head
  included), no allocation; ``boxed``: with their logical axes (for
  ``sharding.logical_shardings``), else plain."""
  module = kptllm if _model_variant(model_config) == "kptllm" else vlm
  params = module.abstract_params(model_config)
  return params if boxed else nn.meta.unbox(params)


def variant_of(config: ml_collections.ConfigDict) -> Variant:
  """The ``Variant`` of ``config`` (reads ``model`` and ``optim.l1_weight``)."""
  if variant(config) == "kptllm":
    return Variant(name="kptllm", model=kptllm.KptLLM(config.model),
                   batch_keys=BATCH_KEYS + KPT_BATCH_KEYS,
                   init_kwargs=functools.partial(kptllm.dummy_support, config.model),
                   forward=_kptllm_forward,
                   loss_terms=(losses.LM_TERM,
                               losses.l1_term(config.optim.get("l1_weight", 2.0))))
  return Variant(name="vlm", model=vlm.VLM(config.model), batch_keys=BATCH_KEYS,
                 init_kwargs=dict, forward=_vlm_forward, loss_terms=(losses.LM_TERM,))


def make_model(config: ml_collections.ConfigDict) -> nn.Module:
  """The Linen module of ``config.model`` (unbound, no params)."""
  return variant_of(config).model


def init_kwargs(config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
  """Shape-only keyword inputs ``model.init`` needs beyond ``vlm.dummy_inputs``."""
  return variant_of(config).init_kwargs()


def batch_keys(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The train-batch fields the step reads."""
  return variant_of(config).batch_keys


def tokenizer(config: ml_collections.ConfigDict) -> Any:
  """The tokenizer the model's vocabulary goes with: ``checkpoints.tokenizer_dir`` ('' =
  the bundled tiny one), with ``<loc_0>``..``<loc_{data.loc_bins-1}>`` made sure of when
  ``data.coord_format == 'loc_tokens'`` (``kptjax.data.tokenizer.load_tokenizer``)."""
  fmt = config.data.coord_format
  bins = int(config.data.get("loc_bins", 100)) if fmt == "loc_tokens" else 0
  return tokenizer_lib.load_tokenizer(config.checkpoints.tokenizer_dir or "", loc_bins=bins)


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
