"""The curriculum: a training stream that starts with stages drawn from the first items.

With ``data.curriculum`` (e.g. ``'64:500'``) the stream starts with stages drawn from
the first N items only (``CurriculumItems``), not augmented unless
``data.curriculum_augment``: a model trained from scratch first learns to read a few
images, then all of them (the CPU demo).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any

import numpy as np

from kptjax.data.transforms import NO_AUGMENT
from kptjax.errors import ConfigError


def parse_curriculum(text: str) -> tuple[tuple[int, int], ...]:
  """``'64:500,512:300'`` -> ((64, 500), (512, 300)): (first N items, steps) stages."""
  stages = []
  for part in (text or "").split(","):
    if not part.strip():
      continue
    try:
      n, steps = (int(v) for v in part.split(":"))
    except ValueError:
      raise ConfigError(f"data.curriculum: {part!r} is not 'items:steps'") from None
    if n < 1 or steps < 1:
      raise ConfigError(f"data.curriculum: {part!r} needs items >= 1 and steps >= 1")
    stages.append((n, steps))
  return tuple(stages)


@dataclasses.dataclass(frozen=True)
class CurriculumItems:
  """The repeated, shuffled item stream with a small-set warm start (random access).

  Element i of stage k (``stages[k] = (n, steps)``, ``steps * batch`` elements) is
  ``(item, True)`` for one of the first ``n`` items, each epoch of them in a fresh
  permutation; after the stages, ``(item, False)`` for every item, epoch by epoch.
  Deterministic in ``seed`` and i, so a restored iterator continues exactly.
  """
  items: tuple
  stages: tuple[tuple[int, int], ...]
  batch: int
  seed: int

  def __len__(self) -> int:
    return 2**62

  def __getitem__(self, i: int) -> Any:
    start = 0
    for k, (n, steps) in enumerate(self.stages):
      size = steps * self.batch
      if i < start + size:
        return self._pick(k, min(n, len(self.items)), i - start), True
      start += size
    return self._pick(len(self.stages), len(self.items), i - start), False

  def _pick(self, stage: int, n: int, j: int) -> Any:
    epoch, pos = divmod(j, n)
    order = _permutation(self.seed, stage, epoch, n)
    return self.items[int(order[pos])]


@functools.lru_cache(maxsize=8)
def _permutation(seed: int, stage: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, stage, epoch]).permutation(n)


def unaugmented(element: Any) -> Any:
  """A copy of an element builder whose ``crop`` recipe does not augment (a builder
  without a ``crop`` is returned as it is)."""
  crop = getattr(element, "crop", None)
  if crop is None:
    return element
  plain = copy.copy(element)
  plain.crop = dataclasses.replace(crop, augment=NO_AUGMENT)
  return plain


class CurriculumTransform:
  """``(item, in_stage)`` -> ``transform(item)``; without augmentation in the curriculum
  stages unless ``augment_stages`` (``unaugmented(transform)`` there)."""

  def __init__(self, transform: Any, augment_stages: bool):
    self.transform = transform
    self.plain = transform if augment_stages else unaugmented(transform)

  def __call__(self, element: tuple[Any, bool], rng: np.random.Generator) -> Any:
    item, in_stage = element
    return (self.plain if in_stage else self.transform)(item, rng)
