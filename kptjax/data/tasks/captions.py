"""Stage-1 elements: image-caption pairs (LLaVA's CC3M-595K) in the train-batch contract.

Stage 1 aligns the projector on captions (LocLLM, following LLaVA's pretraining with
its 'plain' template): the sequence is the conversation prefix (``<s>`` + image header +
N image placeholders + footer, exactly ``conversation.encode_prefix``) followed by the
caption and ``</s>``; the loss covers the caption tokens and ``</s>``. The whole image
is padded to a square with the mean colour and resized (bilinear) to the ViT input side,
then normalized like the person crops. Captions longer than ``data.max_len`` allows are
cut (the ``</s>`` is kept).

Records come from ``kptjax.data.sources.read_dataset('llava', ...)`` (CaptionRecord);
``kptjax.data.pipeline.make_train_dataset`` picks these elements when the training
records are captions (``tasks.element_for``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
from PIL import Image

from kptjax.data import conversation, transforms
from kptjax.errors import ConfigError


def square_resize(image: np.ndarray, side: int, kind: str) -> np.ndarray:
  """uint8[H, W, 3] -> f32[side, side, 3]: pad to a square (mean colour), resize, normalize."""
  h, w = image.shape[:2]
  mean = np.asarray(transforms.NORMALIZATION[kind][0]) * 255.0
  size = max(h, w)
  square = np.empty((size, size, 3), np.uint8)
  square[:] = np.round(mean).astype(np.uint8)
  top, left = (size - h) // 2, (size - w) // 2
  square[top:top + h, left:left + w] = image
  resized = Image.fromarray(square).resize((side, side), Image.BILINEAR)
  return transforms.normalize_image(np.asarray(resized), kind)


class CaptionElement:
  """(record index, None) + rng -> one stage-1 element (picklable for grain workers).

  Returns:
    ``image`` f32[S, S, 3], ``tokens`` / ``targets`` i32[T], ``loss_mask`` f32[T] (1 where
    the target is a caption token or ``</s>``), ``input_mask`` bool[T]; T = data.max_len.
  """

  name = "caption pipeline"

  def __init__(self, config: Any, tokenizer: Any, records: Sequence[Any]):
    self.records = list(records)
    self.side = int(config.model.vit.image_size)
    self.normalization = config.data.normalization
    self.max_len = int(config.data.max_len)
    self.encoder = conversation.encoder_for(config, tokenizer)
    self.prefix = self.encoder.prefix()
    if len(self.prefix) + 2 > self.max_len:
      raise ConfigError(f"data.max_len={self.max_len} leaves no room for a caption after "
                        f"the {len(self.prefix)}-token image prefix")

  def __call__(self, item: tuple[int, Optional[tuple[int, ...]]],
               rng: np.random.Generator) -> dict[str, np.ndarray]:
    del rng   # no augmentation
    record = self.records[item[0]]
    image = square_resize(transforms.load_image(record.image_path), self.side,
                          self.normalization)
    room = self.max_len - len(self.prefix) - 1
    caption = self.encoder.tokenize(record.caption.strip())[:room] + [self.encoder.eos_id]
    is_answer = [False] * len(self.prefix) + [True] * len(caption)
    return dict(image=image, **conversation.pack_sequence(self.prefix + caption, is_answer,
                                                           self.max_len, self.encoder.pad_id))
