"""What an evaluation loads: the config a checkpoint was trained with, the model and its
params (one loader for every model variant, via ``kptjax.models.factory``), the
tokenizer, and the eval records.

    >>> config, model, params = load_model(config, checkpoint="runs/a")
    >>> tokenizer = load_tokenizer(config)
    >>> records = load_eval_records(config, "coco,ann_file=/x.json,image_root=/img")
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import ml_collections
from absl import logging

from kptjax import convert, errors
from kptjax.data import pipeline
from kptjax.data.sources import eval_options, read_dataset
from kptjax.data.sources.catalog import parse_options
from kptjax.models import factory, vlm
from kptjax.training import checkpoint as ckpt_lib

MODEL_CONFIG = "model_config.json"   # what kptjax.train writes beside checkpoints/


def model_config_file(checkpoint: str) -> Optional[str]:
  """``model_config.json`` of a training workdir (or of the workdir above its
  ``checkpoints`` dir); None when there is none."""
  path = os.path.abspath(checkpoint.rstrip("/"))
  for d in (path, os.path.dirname(path)):
    candidate = os.path.join(d, MODEL_CONFIG)
    if os.path.exists(candidate):
      return candidate
  return None


def with_model(config: Any, model_config: Any) -> Any:
  """A locked copy of ``config`` whose model section is ``model_config`` (a mapping)."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.model = ml_collections.ConfigDict(dict(model_config))
  return c.lock()


def resolve_config(config: Any, checkpoint: str = "") -> Any:
  """``config`` with the model section of the checkpoint's ``model_config.json`` (what
  training resolved from the Hugging Face dirs) when there is one; reads no weights."""
  model_file = model_config_file(checkpoint) if checkpoint else None
  if not model_file:
    return config
  with open(model_file, encoding="utf-8") as f:
    return with_model(config, json.load(f))


def checkpoint_step(checkpoint: str) -> Optional[int]:
  """The step ``load_model`` restores from ``checkpoint`` (its latest), None without one."""
  if not checkpoint or not os.path.isdir(checkpoint):
    return None
  try:
    return ckpt_lib.latest_step(checkpoint)
  except errors.CheckpointError:
    return None


def _random_params(config: Any, model: nn.Module) -> Any:
  """Randomly initialized params of ``config.model`` (seed ``config.seed``)."""
  init = jax.jit(lambda key: model.init(key, *vlm.dummy_inputs(config.model),
                                        **factory.init_kwargs(config)))
  params = nn.meta.unbox(init(jax.random.key(config.seed))["params"])
  return vlm.rescale_init(params, config.model)


def load_model(config: Any, checkpoint: str = "", step: Optional[int] = None
               ) -> tuple[Any, Any, Any]:
  """(config, model, params) for inference; the model is ``factory.make_model(config)``
  (a VLM, or KptLLM when the config asks for it).

  From a kptjax checkpoint (a training workdir or its ``checkpoints`` dir, at ``step``,
  default the latest; the model section is taken from the workdir's
  ``model_config.json`` when present, as training resolved it from the Hugging Face
  dirs), else from the Hugging Face dirs in ``config.checkpoints`` (modules they do not
  hold, e.g. KptLLM's prompt encoder and head, randomly initialized), else random
  weights (logged).

  Raises:
    CheckpointError: the checkpoint is unreadable or lacks some of the model's params.
  """
  if checkpoint:
    if not os.path.exists(checkpoint):
      raise errors.CheckpointError(f"{checkpoint}: no such checkpoint directory")
    config = resolve_config(config, checkpoint)
    model = factory.make_model(config)
    abstract = factory.abstract_params(config.model, boxed=False)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params, missing = ckpt_lib.load_params(checkpoint, abstract,
                                           jax.tree.map(lambda _: device, abstract), step=step)
    if missing:
      raise errors.CheckpointError(
          f"{checkpoint}: {len(missing)} params of the model are not in the checkpoint "
          f"(is --config the one it was trained with?): {missing[:5]}")
    return config, model, params
  if config.checkpoints.llm_dir or config.checkpoints.vit_dir:
    model_config, params = convert.load_vlm(config)
    config = with_model(config, model_config.to_dict())
    model = factory.make_model(config)
    if set(factory.abstract_params(config.model, boxed=False)) - set(params):  # dirs lack some
      params = {**_random_params(config, model), **params}
    return config, model, params
  logging.warning("No --checkpoint and no config.checkpoints dirs: random weights.")
  model = factory.make_model(config)
  return config, model, _random_params(config, model)


load_tokenizer = factory.tokenizer   # the model's tokenizer: one definition, the factory's


def parse_dataset(dataset: str) -> tuple[str, dict[str, Any]]:
  """'source,key=value,...' -> (source, {key: value}) (values as Python literals)."""
  name, *rest = [p.strip() for p in dataset.split(",") if p.strip()]
  for part in rest:
    if "=" not in part:
      raise errors.ConfigError(f"--dataset: expected key=value after the source name, "
                               f"got '{part}'")
  return name, parse_options(",".join(rest))


def load_eval_records(config: Any, dataset: str = "") -> Any:
  """Records of ``dataset`` ('source,key=value,...') or of ``config.data.eval``."""
  if not dataset:
    return pipeline.load_records(config, "eval")
  name, options = parse_dataset(dataset)
  return read_dataset(name, **eval_options(name, options))


def dataset_values(config: Any, dataset: str = "") -> list[Any]:
  """The option values of the dataset spec: ``dataset``'s key=value pairs, or the fields
  of ``config.data.eval`` and of its ``options`` string (for provenance file stamps)."""
  if dataset:
    return list(parse_dataset(dataset)[1].values())
  d = config.data.eval
  return list(d.values()) + list(parse_options(d.get("options", "")).values())
