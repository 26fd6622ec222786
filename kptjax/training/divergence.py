"""A non-finite loss, explained by what its batch held.

The train loop records ``inspect_batch`` of every host batch beside the step's metrics;
``check_finite`` raises at the first non-finite loss with what was found: the step (its
batch is the one the step consumed), whether the batch had NaN/inf inputs, whether token
ids fell outside the vocabulary (the embedding lookup reads NaN past the table), and only
when neither, that the update itself diverged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def inspect_batch(batch: Mapping[str, np.ndarray], vocab_size: int) -> dict[str, Any]:
  """What a NaN loss would need to know about one host batch (cheap: one pass).

  Returns:
    ``nonfinite``: {field: count of NaN/inf values} of the float fields that have any;
    ``bad_ids``: {field: (count of ids outside [0, vocab_size), min, max)} of
    ``tokens`` / ``targets`` where any id is outside.
  """
  nonfinite = {k: int(v.size - np.isfinite(v).sum()) for k, v in batch.items()
               if np.issubdtype(v.dtype, np.floating)}
  bad_ids = {}
  for k in ("tokens", "targets"):
    if k in batch:
      v = batch[k]
      n = int(((v < 0) | (v >= vocab_size)).sum())
      if n:
        bad_ids[k] = (n, int(v.min()), int(v.max()))
  return dict(nonfinite={k: n for k, n in nonfinite.items() if n}, bad_ids=bad_ids)


def check_finite(history: list[tuple[int, dict[str, np.ndarray], dict[str, Any]]],
                 vocab_size: int) -> None:
  """Raises FloatingPointError at the first non-finite loss, saying what its batch held."""
  for step, m, facts in history:
    if np.isfinite(m["loss"]):
      continue
    found = []
    if facts["nonfinite"]:
      found.append("the batch has non-finite inputs: " + ", ".join(
          f"{k} {n} NaN/inf values" for k, n in facts["nonfinite"].items()))
    if facts["bad_ids"]:
      found.append(f"token ids outside the vocabulary [0, {vocab_size}) "
                   "(model.llm.vocab_size; the embedding lookup reads NaN past the table): "
                   + ", ".join(f"{k} {n} ids (min {lo}, max {hi})"
                               for k, (n, lo, hi) in facts["bad_ids"].items()))
    if not found:
      found.append("its inputs were finite and every token id was in the vocabulary, so "
                   "the update itself diverged: lower optim.lr, or use float32 (model.dtype)")
    raise FloatingPointError(
        f"loss is {m['loss']} at step {step}, on the batch of step {step} (grad_norm "
        f"{m['grad_norm']}, lr {m['lr']}); stopping: " + "; ".join(found))
