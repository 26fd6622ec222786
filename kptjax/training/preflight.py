"""Checks a run makes before anything heavy is read, compiled or written.

* ``check_agreement(config, tokenizer)``: the model section (as the checkpoints' config.json
  decide it, ``kptjax.convert.model_config``) agrees with the tokenizer and the data:
  every tokenizer id has a row in the embedding table, the special and placeholder ids
  are in range and distinct, the crop is a whole number of patches, the image tokens fit
  in ``data.max_len``, and ``data.max_len`` in the LLM's positions.
* ``requested_model(config, workdir, resuming)``: all of the above, run first by
  ``kptjax.training.trainer.run``; returns the config with the model section it builds.
* ``with_model_config(config, model_config)``: the config with the model section a run
  actually builds (the checkpoints' numbers, or a workdir's ``model_config.json``).
* A workdir belongs to one model: ``model_config.json`` is written once (``write_model_config``)
  and compared with the requested model section on resume (``check_workdir_model``);
  ``config_differences`` is the comparison, for any two saved configs.

Every problem is a one-line ``ConfigError`` naming the fields (and files) involved.
"""

from __future__ import annotations

import fnmatch
import json
import os
from typing import Any, Iterable, Mapping

import ml_collections
from absl import logging

from kptjax import convert, storage
from kptjax.errors import ConfigError
from kptjax.models import factory

MODEL_CONFIG_FILE = "model_config.json"
_MISSING = "<absent>"


def with_model_config(config: ml_collections.ConfigDict,
                      model_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of ``config`` whose model section is ``model_config`` (locked)."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.model = ml_collections.ConfigDict(model_config.to_dict())
  return config.lock()


# ------------------------------------------------------------ config vs checkpoints
def _source(config: ml_collections.ConfigDict, tower: str) -> str:
  d = config.checkpoints.get(f"{tower}_dir", "")
  return f" (from {d}/config.json)" if d else ""


def _tokenizer_name(config: ml_collections.ConfigDict) -> str:
  d = config.checkpoints.get("tokenizer_dir", "")
  return f"tokenizer {d}" if d else "the bundled tiny tokenizer"


def agreement_problems(config: ml_collections.ConfigDict, tokenizer: Any) -> list[str]:
  """What does not agree between ``config.model`` (resolved), the tokenizer and the data.

  Args:
    config: a full config whose model section is the one the run builds.
    tokenizer: the run's tokenizer (``len(tokenizer)`` ids, ``*_token_id`` attributes).

  Returns:
    One sentence per problem (empty when everything agrees).
  """
  m, problems = config.model, []
  vocab = int(m.llm.vocab_size)
  n_tok = len(tokenizer)
  if n_tok > vocab:
    problems.append(
        f"{_tokenizer_name(config)} has {n_tok} ids, the embedding table model.llm.vocab_size="
        f"{vocab}{_source(config, 'llm')}: ids {vocab}..{n_tok - 1} have no row (give the "
        "checkpoint's own tokenizer as checkpoints.tokenizer_dir, or add rows for the new "
        "tokens with model.llm.new_token_init='mean' or 'normal')")
  ids = {f"tokenizer {name}": getattr(tokenizer, name, None)
         for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
  ids["model.image_token_id"] = m.get("image_token_id", None)
  if factory.variant(config) == "kptllm":
    ids["model.kpt.prompt_token_id"] = m.kpt.prompt_token_id
    ids["model.kpt.keypoint_token_id"] = m.kpt.keypoint_token_id
  for name, value in ids.items():
    if value is not None and not 0 <= int(value) < vocab:
      problems.append(f"{name}={value} is outside the embedding table [0, {vocab})")
  image_id = ids["model.image_token_id"]
  clash = [name for name, value in ids.items()
           if name.startswith("tokenizer") and value is not None and image_id is not None
           and int(value) == int(image_id)]
  if clash:
    problems.append(f"model.image_token_id={image_id} is also the {clash[0]}: those tokens "
                    "would be replaced by image features")

  v = m.vit
  if v.image_size % v.patch_size:
    problems.append(f"model.vit.image_size={v.image_size} is not a multiple of "
                    f"model.vit.patch_size={v.patch_size}{_source(config, 'vit')}")
  elif v.get("pos_embed", "learned") == "learned" and v.pretrained_image_size % v.patch_size:
    problems.append(f"the position table's side model.vit.pretrained_image_size="
                    f"{v.pretrained_image_size}{_source(config, 'vit')} is not a multiple of "
                    f"model.vit.patch_size={v.patch_size}")
  else:
    n_image = (v.image_size // v.patch_size) ** 2
    if n_image >= config.data.max_len:
      problems.append(f"{n_image} image tokens ({v.image_size} px / {v.patch_size} px "
                      f"patches) do not leave room for text in data.max_len="
                      f"{config.data.max_len}")
  if config.data.max_len > m.llm.max_position_embeddings:
    problems.append(f"data.max_len={config.data.max_len} exceeds "
                    f"model.llm.max_position_embeddings={m.llm.max_position_embeddings}")
  return problems


def check_agreement(config: ml_collections.ConfigDict, tokenizer: Any) -> None:
  """Raises ConfigError listing every ``agreement_problems`` (one line)."""
  problems = agreement_problems(config, tokenizer)
  if problems:
    raise ConfigError("config and checkpoints disagree: " + "; ".join(problems))


# ----------------------------------------------------------- a workdir, one model
def _flat(tree: Mapping[str, Any], prefix: str) -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
  return out


def config_differences(saved: Mapping[str, Any], requested: Mapping[str, Any], *,
                       prefix: str = "", may_change: Iterable[str] = ()
                       ) -> list[tuple[str, Any, Any]]:
  """The fields whose values differ between two (nested) configs.

  Args:
    saved, requested: nested mappings (``ConfigDict.to_dict()``, parsed JSON).
    prefix: prepended to the dotted names, e.g. 'model.'.
    may_change: dotted names or ``fnmatch`` patterns ('model.lora.*') left out.

  Returns:
    [(dotted name, saved value, requested value)] sorted by name; a field present on one
    side only has the value '<absent>' on the other.
  """
  a, b = _flat(saved, prefix), _flat(requested, prefix)
  patterns = [p.strip() for p in may_change if p.strip()]
  return [(name, a.get(name, _MISSING), b.get(name, _MISSING))
          for name in sorted(set(a) | set(b))
          if a.get(name, _MISSING) != b.get(name, _MISSING)
          and not any(fnmatch.fnmatchcase(name, p) for p in patterns)]


def may_change(config: ml_collections.ConfigDict) -> list[str]:
  """``train.resume_may_change``: comma-separated model fields a resumed run may change."""
  return [p for p in str(config.train.get("resume_may_change", "")).split(",") if p.strip()]


def check_workdir_model(workdir: str, model_config: ml_collections.ConfigDict,
                        allowed: Iterable[str] = ()) -> list[tuple[str, Any, Any]]:
  """Compares ``WORKDIR/model_config.json`` with the requested model section.

  Args:
    workdir: the run's workdir (nothing is written).
    model_config: the model section the run would build.
    allowed: fields that may differ (``may_change``).

  Returns:
    The allowed differences (empty if none or if the workdir has no model_config.json).

  Raises:
    ConfigError: listing every field that differs and is not allowed.
  """
  path = storage.path(workdir) / MODEL_CONFIG_FILE
  if not path.exists():
    return []
  try:
    saved = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path}: malformed JSON: {e}") from e
  requested = json.loads(model_config.to_json())
  allowed = list(allowed)
  refused = config_differences(saved, requested, prefix="model.", may_change=allowed)
  if refused:
    listed = ", ".join(f"{n} (saved {s!r}, requested {r!r})" for n, s, r in refused)
    raise ConfigError(f"{path}: this workdir holds another model: {listed}. Use another "
                      "--workdir, or list the fields that may change in "
                      "train.resume_may_change")
  return config_differences(saved, requested, prefix="model.")


def write_model_config(workdir: str, model_config: ml_collections.ConfigDict) -> None:
  """Writes ``WORKDIR/model_config.json`` atomically (a temp file renamed over it)."""
  storage.write_atomic(os.path.join(workdir, MODEL_CONFIG_FILE), model_config.to_json(indent=2))


def requested_model(config: ml_collections.ConfigDict, workdir: str, resuming: bool
                    ) -> ml_collections.ConfigDict:
  """``config`` with the model section the run builds, checked before anything is written.

  The Hugging Face checkpoints' config.json decide the architecture numbers
  (``kptjax.convert.model_config``: no tensor is read). The result must agree with the
  tokenizer and the data (``check_agreement``) and, on resume, with the
  workdir's ``model_config.json`` (``check_workdir_model``; the fields in
  ``train.resume_may_change`` may differ).

  Raises:
    ConfigError / CheckpointError naming the field or file.
  """
  if config.checkpoints.llm_dir or config.checkpoints.vit_dir:
    config = with_model_config(config, convert.model_config(config))
  check_agreement(config, factory.tokenizer(config))
  if resuming:
    changed = check_workdir_model(workdir, config.model, may_change(config))
    if changed:
      logging.warning("Resuming %s with changed model fields (train.resume_may_change): %s",
                      workdir, changed)
  return config
