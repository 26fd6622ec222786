"""Stage-1 batches: image-caption pairs (LLaVA's CC3M-595K) in the train-batch contract.

Stage 1 aligns the projector on captions (LocLLM, following LLaVA's pretraining with
its 'plain' template): the sequence is the conversation prefix (``<s>`` + image header +
N image placeholders + footer, exactly ``conversation.encode_prefix``) followed by the
caption and ``</s>``; the loss covers the caption tokens and ``</s>``. The whole image
is padded to a square with the mean colour and resized (bilinear) to the ViT input side,
then normalized like the person crops. Captions longer than ``data.max_len`` allows are
cut (the ``</s>`` is kept).

Records come from ``kptjax.data.sources.read_dataset('llava', ...)`` (CaptionRecord);
``kptjax.train.make_dataset`` picks this pipeline when the training records are captions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from absl import logging
from PIL import Image

from kptjax.data import conversation, pipeline, transforms
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


class CaptionTransform:
  """CaptionRecord -> one stage-1 example (picklable for grain workers).

  Returns:
    ``image`` f32[S, S, 3], ``tokens`` / ``targets`` i32[T], ``loss_mask`` f32[T] (1 where
    the target is a caption token or ``</s>``), ``input_mask`` bool[T]; T = data.max_len.
  """

  def __init__(self, config: Any, tokenizer: Any):
    self.side = int(config.model.vit.image_size)
    self.normalization = config.data.normalization
    self.max_len = int(config.data.max_len)
    encoder = conversation.ConversationEncoder(
        tokenizer, config.data, conversation.num_image_tokens(config.model),
        image_token_id=config.model.get("image_token_id", None))
    self.encoder = encoder
    self.prefix = encoder.prefix()
    if len(self.prefix) + 2 > self.max_len:
      raise ConfigError(f"data.max_len={self.max_len} leaves no room for a caption after "
                        f"the {len(self.prefix)}-token image prefix")

  def __call__(self, record: Any) -> dict[str, np.ndarray]:
    image = square_resize(transforms.load_image(record.image_path), self.side,
                          self.normalization)
    room = self.max_len - len(self.prefix) - 1
    caption = self.encoder.tokenize(record.caption.strip())[:room] + [self.encoder.eos_id]
    seq = self.prefix + caption
    n, t = len(seq), self.max_len
    tokens = np.full((t,), self.encoder.pad_id, np.int32)
    tokens[:n] = seq
    targets = np.full((t,), self.encoder.pad_id, np.int32)
    targets[:n - 1] = seq[1:]
    loss_mask = np.zeros((t,), np.float32)
    loss_mask[len(self.prefix) - 1:n - 1] = 1.0   # positions whose target is the caption
    input_mask = np.zeros((t,), bool)
    input_mask[:n] = True
    return dict(image=image, tokens=tokens, targets=targets, loss_mask=loss_mask,
                input_mask=input_mask)


def make_caption_dataset(config: Any, tokenizer: Any, records: Sequence[Any], *,
                         process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """Shuffled, repeated stage-1 batches of B = train.batch_size // process_count.

  Args:
    config: the full config (model.vit, model.image_token_id, data, train, seed).
    tokenizer: the tokenizer the model uses.
    records: CaptionRecords; each process takes ``records[process_index::process_count]``.

  Batches: ``CaptionTransform``'s fields and ``skipped_images`` i32[B] (pairs whose image
  could not be read, skipped as ``pipeline.skip_unreadable`` does).
  """
  if not records:
    raise ConfigError("no caption records for stage 1")
  batch = config.train.batch_size // process_count
  mine = list(records)[process_index::process_count]
  logging.info("caption pipeline: %d pairs for process %d/%d, batch %d", len(mine),
               process_index, process_count, batch)
  ds = grain.MapDataset.source(mine).shuffle(seed=int(config.seed)).repeat()
  # An unreadable image is skipped and counted as in the keypoint pipelines.
  it = pipeline.skip_unreadable(ds, CaptionTransform(config, tokenizer), config,
                                limit=len(mine), random=False)
  return it.batch(batch, drop_remainder=True)
