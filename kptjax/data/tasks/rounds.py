"""LocLLM / PoseLLM / CapeLLM training elements: one crop, multi-round localization.

Each element is one item: a person (LocLLM's rounds: up to ``data.rounds`` keypoints
in a fresh random order) or one of CapeLLM's fixed keypoint groups (``data.group_size``;
the groups are cut by ``pipeline.train_items``). The crop is augmented
(``transforms.CropRecipe``); a keypoint that leaves the crop is not asked. With
``coord_format='decimal3d'`` the answer carries the root-relative depth (mm).

Returns the train-batch fields: ``image`` f32[S, S, 3] (normalized), ``tokens`` /
``targets`` i32[T], ``loss_mask`` f32[T], ``input_mask`` bool[T] (T = data.max_len).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from kptjax.data import conversation
from kptjax.data.sources import specs_of
from kptjax.data.transforms import CropRecipe
from kptjax.errors import DataError


def with_depth(crop: dict[str, Any], spec: Any, record: Any) -> np.ndarray:
  """f32[K, 4] (x, y crop px, z - z_root mm, v) for decimal3d answers."""
  k3 = crop.get("keypoints_3d")
  if k3 is None:
    raise DataError(record.image_path, "coord_format 'decimal3d' needs 3D keypoints",
                    field="keypoints_3d", record=record.ann_id)
  root = spec.root_index if spec.root_index is not None else 0
  kp = crop["keypoints"]
  out = np.zeros((kp.shape[0], 4), np.float32)
  out[:, :2] = kp[:, :2]
  out[:, 2] = k3[:, 2] - k3[root, 2]
  out[:, 3] = np.where(k3[:, 3] > 0, kp[:, 2], 0.0)
  return out


class RoundsElement:
  """(record index, keypoint group) + rng -> one training element (picklable for workers)."""

  name = "train pipeline"

  def __init__(self, config: Any, tokenizer: Any, records: Sequence[Any]):
    self.records = list(records)
    self.specs = specs_of(records)
    self.crop = CropRecipe.from_config(config)
    self.coord_format = config.data.coord_format
    self.encoder = conversation.encoder_for(config, tokenizer)

  def __call__(self, item: tuple[int, Optional[tuple[int, ...]]],
               rng: np.random.Generator) -> dict[str, np.ndarray]:
    index, group = item
    record = self.records[index]
    spec = self.specs[record.spec]
    crop = self.crop(record, spec, rng)
    kp = with_depth(crop, spec, record) if self.coord_format == "decimal3d" \
        else crop["keypoints"]
    ex = self.encoder.encode(kp, self.crop.side, spec, rng, keypoint_ids=group)
    return dict(image=crop["image"], tokens=ex["tokens"], targets=ex["targets"],
                loss_mask=ex["loss_mask"], input_mask=ex["input_mask"])
