"""LocLLM / PoseLLM / CapeLLM training elements: one crop, multi-round localization.

Each element is one item: a person (LocLLM's rounds: up to ``data.rounds`` keypoints
in a fresh random order) or one of CapeLLM's fixed keypoint groups (``data.group_size``;
the groups are cut by ``pipeline.train_items``). The crop is augmented
(``transforms.CropRecipe``); a keypoint that leaves the crop is not asked. With
``coord_format='decimal3d'`` the answer carries the root-relative depth (mm); with
``data.depth_optional`` a record without 3D joints (MPII in LocLLM's H36M + MPII mix)
is answered in ``decimal2d`` instead of being an error.

Dynamic rounds (CapeLLM's dynamic-round training, ``data.rounds_mode='dynamic'``): each
element asks n ~ U{``rounds_min``..``rounds_max``} keypoints (``rounds_max`` 0: all),
a random subset in random order of the person's labeled in-crop keypoints, drawn from
the element's generator (grain's ``random_map``: seeded by ``config.seed`` and the
element's index in the repeated stream, i.e. by (seed, epoch, item)), so the number and
choice vary per item and per epoch, are the same in two runs and resume exactly.
``rounds_mode='fixed'`` (the default) keeps ``data.rounds`` / ``data.group_size``.

Returns the train-batch fields: ``image`` f32[S, S, 3] (normalized), ``tokens`` /
``targets`` i32[T], ``loss_mask`` f32[T], ``input_mask`` bool[T] (T = data.max_len).
"""

from __future__ import annotations

import copy
from typing import Any, Optional, Sequence

import numpy as np

from kptjax.data import conversation
from kptjax.data.sources import specs_of
from kptjax.data.transforms import CropRecipe
from kptjax.errors import ConfigError, DataError

ROUNDS_MODES = ("fixed", "dynamic")


def rounds_range(data: Any) -> Optional[tuple[int, int]]:
  """(min, max) keypoints per element of ``data.rounds_mode='dynamic'`` (max 0: all
  keypoints), None for 'fixed'.

  Raises:
    ConfigError: an unknown mode, min < 1, max in 1..min-1, or dynamic with
      ``data.group_size`` (the two choose the keypoints differently).
  """
  mode = data.get("rounds_mode", "fixed") or "fixed"
  if mode not in ROUNDS_MODES:
    raise ConfigError(f"data.rounds_mode={mode!r}; choose from {ROUNDS_MODES}")
  if mode == "fixed":
    return None
  lo, hi = int(data.get("rounds_min", 1)), int(data.get("rounds_max", 0))
  if lo < 1 or (hi and hi < lo):
    raise ConfigError(f"data.rounds_min={lo}, rounds_max={hi}: need 1 <= min <= max "
                      "(max 0: all keypoints)")
  if int(data.get("group_size", 0)):
    raise ConfigError("data.rounds_mode='dynamic' draws each element's keypoints itself: "
                      "set data.group_size=0")
  return lo, hi


def dynamic_group(keypoints_crop: np.ndarray, side: int, lo: int, hi: int,
                  rng: np.random.Generator) -> tuple[int, ...]:
  """n ~ U{lo..hi} (hi 0: all) of the labeled in-crop keypoints, in random order."""
  order = conversation.sample_rounds(keypoints_crop, side, {}, None,
                                     keypoint_ids=rng.permutation(len(keypoints_crop)))
  n = int(rng.integers(lo, (hi or len(keypoints_crop)) + 1))
  return tuple(order[:n])


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
    self.dynamic = rounds_range(config.data)
    self.encoder_2d = None    # answers of records without depth (data.depth_optional)
    if self.coord_format == "decimal3d" and config.data.get("depth_optional", False):
      plain = copy.deepcopy(config)
      with plain.unlocked():
        plain.data.coord_format = "decimal2d"
      self.encoder_2d = conversation.encoder_for(plain, tokenizer)

  def __call__(self, item: tuple[int, Optional[tuple[int, ...]]],
               rng: np.random.Generator) -> dict[str, np.ndarray]:
    index, group = item
    record = self.records[index]
    spec = self.specs[record.spec]
    crop = self.crop(record, spec, rng)
    encoder, kp = self.encoder, crop["keypoints"]
    if self.coord_format == "decimal3d":
      if self.encoder_2d is not None and crop.get("keypoints_3d") is None:
        encoder = self.encoder_2d
      else:
        kp = with_depth(crop, spec, record)
    if self.dynamic is not None:
      group = dynamic_group(kp, self.crop.side, *self.dynamic, rng)
    ex = encoder.encode(kp, self.crop.side, spec, rng, keypoint_ids=group)
    return dict(image=crop["image"], tokens=ex["tokens"], targets=ex["targets"],
                loss_mask=ex["loss_mask"], input_mask=ex["input_mask"])
