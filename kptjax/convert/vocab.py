"""Adding tokens to a checkpoint's vocabulary, deliberately (LocLLM's location tokens).

``coord_format='loc_tokens'`` adds ``<loc_0>..<loc_{B-1}>`` to a Hugging Face tokenizer
(``kptjax.data.tokenizer.load_tokenizer(path, loc_bins=B)``); their ids start at the
checkpoint's ``vocab_size``. With ``model.llm.new_token_init`` set, the model gets those
rows: ``vocab_size`` grows to ``len(tokenizer)`` and ``new_tokens`` counts the rows added,
stored as their own leaves (``llm/embed_tokens/new_embedding [N,D]`` and, untied,
``llm/new_lm_head [D,N]``) so they train (``lora.NEW_ROW_LEAVES``) while the checkpoint's
rows stay bit-identical. Without it, a tokenizer longer than the table is refused
(``kptjax.training.preflight``).

Initialization (``new_token_init``):
* ``'mean'``   every new row is the mean of the checkpoint's rows (embedding and output
  layer alike), so the new tokens start as an average token;
* ``'normal'`` N(0, 0.02^2), as a fresh Llama's embedding.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from kptjax.errors import ConfigError
from kptjax.models import factory

NEW_TOKEN_INITS = ("mean", "normal")
NORMAL_STD = 0.02


def tokenizer_length(config: ml_collections.ConfigDict) -> int:
  """``len`` of the run's tokenizer (location tokens added when the format uses them)."""
  return len(factory.tokenizer(config))


def resize(llm_config: ml_collections.ConfigDict, config: ml_collections.ConfigDict
           ) -> ml_collections.ConfigDict:
  """``llm_config`` (a checkpoint's, ``new_tokens`` = 0) with rows for the tokenizer's
  added tokens when ``config.model.llm.new_token_init`` asks for them; else unchanged."""
  init = config.model.llm.get("new_token_init", "") or ""
  if not init:
    return llm_config
  if init not in NEW_TOKEN_INITS:
    raise ConfigError(f"model.llm.new_token_init={init!r} (expected one of "
                      f"{NEW_TOKEN_INITS}, or '' to refuse added tokens)")
  out = ml_collections.ConfigDict(llm_config.to_dict())
  base = int(out.vocab_size) - int(out.get("new_tokens", 0) or 0)
  added = max(0, tokenizer_length(config) - base)
  out.vocab_size, out.new_tokens, out.new_token_init = base + added, added, init
  return out


def new_rows(llm_params: dict, llm_config: Any, rng: jax.Array) -> dict[str, np.ndarray]:
  """The added rows' leaves for a loaded checkpoint: ``{'embed_tokens/new_embedding':
  [N,D], 'new_lm_head': [D,N] (untied only)}`` in the checkpoint's dtype."""
  n = int(llm_config.get("new_tokens", 0) or 0)
  if not n:
    return {}
  init = llm_config.get("new_token_init", "mean") or "mean"
  embedding = np.asarray(llm_params["embed_tokens"]["embedding"])        # [V,D]
  heads = {"embed_tokens/new_embedding": (embedding, 0)}
  if not llm_config.tie_word_embeddings:
    heads["new_lm_head"] = (np.asarray(llm_params["lm_head"]["kernel"]), 1)   # [D,V]
  out = {}
  for (name, (table, vocab_axis)), key in zip(heads.items(), jax.random.split(rng, 2)):
    shape = (n, table.shape[1]) if vocab_axis == 0 else (table.shape[0], n)
    if init == "mean":
      row = table.astype(np.float64).mean(axis=vocab_axis, keepdims=True)
      value = np.broadcast_to(row, shape)
    else:
      value = NORMAL_STD * np.asarray(jax.random.normal(key, shape))
    out[name] = np.ascontiguousarray(value, dtype=table.dtype)
  return out


def with_new_rows(table: np.ndarray, new: np.ndarray | None, vocab_axis: int) -> np.ndarray:
  """The full table (checkpoint rows, then added rows) for an export."""
  return table if new is None else np.concatenate([table, np.asarray(new, table.dtype)],
                                                  axis=vocab_axis)
