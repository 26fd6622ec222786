"""Unreadable training images: skipped, counted and logged, the stream staying exact.

An element whose image (or a support image) is missing or cannot be decoded
(``transforms.load_image`` raises ``ImageError``) is skipped and logged with the file's
name; ``skipped_images[b]`` counts the elements skipped just before row b, so the
batches' sum is the number skipped (``kptjax.train`` logs the running total as
``skipped_images``). The skip keeps the stream deterministic and resumable (the element
indices do not move). ``data.strict_images=True`` (``python -m kptjax.train --strict``)
raises the ImageError instead; a whole epoch of unreadable images in a row is an
ImageError either way.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import grain
import numpy as np
from absl import logging

from kptjax.data import thread_priority
from kptjax.errors import ImageError

SKIPPED_IMAGES = "skipped_images"   # the batch field counting skipped elements


@dataclasses.dataclass(frozen=True)
class SkippedImage:
  """Stands in for a training element whose image could not be read (``SkipUnreadable``).

  Attributes:
    path: the image file.
    reason: the ImageError's message.
  """
  path: str
  reason: str


class SkipUnreadable:
  """A training transform whose ``ImageError`` becomes a logged ``SkippedImage``, or is
  raised when ``strict`` (``data.strict_images``). Picklable for grain workers."""

  def __init__(self, transform: Callable[..., Any], strict: bool):
    self.transform = transform
    self.strict = strict

  def __call__(self, *args: Any) -> Any:
    try:
      return self.transform(*args)
    except ImageError as e:
      if self.strict:
        raise
      logging.warning("Skipping a training example (data.strict_images=False): %s", e)
      return SkippedImage(str(e.path), str(e))


class CountSkipped(grain.IterDataset):
  """Drops ``SkippedImage`` elements of ``parent``; every kept element (a dict) gets
  ``skipped_images`` i32: how many were dropped just before it. ``limit`` dropped in a
  row (nothing readable left) is an ImageError."""

  def __init__(self, parent: grain.IterDataset, limit: int):
    super().__init__(parent)
    self.limit = max(int(limit), 1)

  def __iter__(self) -> grain.DatasetIterator:
    return _CountSkippedIterator(self._parent.__iter__(), self.limit)


class _CountSkippedIterator(grain.DatasetIterator):
  """``CountSkipped``'s iterator; its state is the parent's (it holds nothing between
  elements, so a restored stream continues exactly)."""

  def __init__(self, parent: grain.DatasetIterator, limit: int):
    super().__init__(parent)
    self.limit = limit

  def __next__(self) -> dict[str, Any]:
    skipped = 0
    while True:
      element = next(self._parent)
      if not isinstance(element, SkippedImage):
        return {**element, SKIPPED_IMAGES: np.int32(skipped)}
      skipped += 1
      if skipped >= self.limit:
        raise ImageError(element.path, f"{skipped} training examples in a row have no "
                         f"readable image; the last: {element.reason}", field="image")

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)


def skip_unreadable(ds: grain.MapDataset, transform: Callable[..., Any], config: Any, *,
                    limit: int, read_options: Optional[grain.ReadOptions] = None
                    ) -> grain.IterDataset:
  """``ds`` mapped by ``transform`` (a grain ``random_map`` seeded by ``config.seed``),
  with unreadable images skipped and counted (module docstring), as an IterDataset; the
  threads that run ``transform`` at ``data.read_thread_priority``
  (``kptjax.data.thread_priority``).

  Args:
    limit: this many skipped in a row is an ImageError (nothing readable is left).
  """
  priority = thread_priority.from_config(config)
  if priority != "normal":
    transform = thread_priority.AtPriority(transform, priority)
  guarded = SkipUnreadable(transform, bool(config.data.get("strict_images", False)))
  ds = ds.random_map(guarded, seed=int(config.seed))
  return CountSkipped(ds.to_iter_dataset(read_options), limit)
