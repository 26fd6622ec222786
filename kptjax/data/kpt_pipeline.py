"""KptLLM's training stream: the train pipeline with support instances and mixed tasks.

Each element is one item (a person / object, or one of CapeLLM's keypoint groups, as in
``pipeline``); its generator picks the task from ``config.data.tasks`` and, for the
visual-prompt task, ``config.data.shots`` support instances of the same category from
other images (fresh every epoch; the fixed, seeded evaluation draw is
``cape.sample_supports``). The semantic-understanding task's support is the query crop
itself (the model names a keypoint marked on the image it sees); the textual task has
no support (its support fields are zeros with a zero mask).

Batches hold the train-batch contract plus (S = shots, R = data.rounds)::

    support_image f32[B,S,H,W,3]  support_xy f32[B,S,R,2]  support_mask f32[B,S,R]
    kpt_xy f32[B,R,2]             kpt_mask f32[B,R]

``support_xy[b, s, r]`` is the keypoint that row b's r-th ``<prompt>`` slot asks about,
in support s's crop (normalized); ``kpt_xy[b, r]`` the r-th ``<keypoint>`` answer.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import grain
import numpy as np

from kptjax.data import conversation
from kptjax.data import kpt_tasks
from kptjax.data import pipeline
from kptjax.data import transforms
from kptjax.errors import ConfigError


class KptTrainTransform:
  """(record index, keypoint group) + rng -> one KptLLM training example (picklable)."""

  def __init__(self, config: Any, tokenizer: Any, records: Sequence[Any]):
    self.records = list(records)
    self.specs = pipeline._specs_for(records)
    self.side = int(config.model.vit.image_size)
    self.padding = float(config.data.padding)
    self.normalization = config.data.normalization
    self.augment = pipeline.augment_config(config)
    self.shots = int(config.data.shots)
    self.rounds = int(config.data.rounds)
    self.tasks, self.probs = kpt_tasks.parse_tasks(config.data.tasks)
    if not self.tasks:
      raise ConfigError("KptLLM training needs data.tasks (e.g. 'visual:1,textual:1')")
    kpt = config.model.kpt
    self.encoder = kpt_tasks.TaskEncoder(
        tokenizer, config.data, conversation.num_image_tokens(config.model),
        prompt_token_id=kpt.prompt_token_id, keypoint_token_id=kpt.keypoint_token_id,
        image_token_id=config.model.get("image_token_id", None))
    self.by_spec: dict[str, list[int]] = {}
    for i, r in enumerate(self.records):
      self.by_spec.setdefault(r.spec, []).append(i)

  def _crop(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    record = self.records[index]
    crop = transforms.crop_person(record, transforms.load_record_image(record),
                                  (self.side, self.side), padding=self.padding, rng=rng,
                                  augment_cfg=self.augment, spec=self.specs[record.spec])
    image = transforms.normalize_image(crop["image"], self.normalization).astype(np.float32)
    return image, crop["keypoints"]

  def _support_indices(self, index: int, rng: np.random.Generator) -> list[int]:
    record = self.records[index]
    pool = [i for i in self.by_spec[record.spec]
            if i != index and self.records[i].image_id != record.image_id] or [index]
    return [int(pool[j]) for j in rng.choice(len(pool), self.shots,
                                              replace=len(pool) < self.shots)]

  def __call__(self, item: tuple[int, Optional[tuple[int, ...]]],
               rng: np.random.Generator) -> dict[str, np.ndarray]:
    index, group = item
    spec = self.specs[self.records[index].spec]
    task = self.tasks[int(rng.choice(len(self.tasks), p=self.probs))]
    image, kp = self._crop(index, rng)
    s, r, side = self.shots, self.rounds, self.side
    support_image = np.zeros((s, side, side, 3), np.float32)
    support_kp = np.zeros((s, kp.shape[0], 3), np.float32)
    if task == "semantic":
      support_image[0], support_kp[0] = image, kp
    elif task == "visual":
      for j, i in enumerate(self._support_indices(index, rng)):
        support_image[j], support_kp[j] = self._crop(i, rng)
    valid = np.any(support_kp[:, :, 2] > 0, axis=0)
    ex = self.encoder.encode_task(task, kp, side, spec, rng, keypoint_ids=group,
                                  prompt_valid=valid)
    asked = np.maximum(ex["prompt_index"], 0)
    support_xy = support_kp[:, asked, :2] / side                               # [S,R,2]
    support_mask = ((support_kp[:, asked, 2] > 0) * ex["prompt_mask"][None]).astype(np.float32)
    return dict(image=image, tokens=ex["tokens"], targets=ex["targets"],
                loss_mask=ex["loss_mask"], input_mask=ex["input_mask"],
                support_image=support_image, support_xy=support_xy.astype(np.float32),
                support_mask=support_mask.reshape(s, r), kpt_xy=ex["kpt_xy"],
                kpt_mask=ex["kpt_mask"])


def make_kpt_train_dataset(config: Any, tokenizer: Any, *,
                           records: Optional[Sequence[Any]] = None, process_index: int = 0,
                           process_count: int = 1) -> grain.IterDataset:
  """The KptLLM training stream for this process (``pipeline.make_train_dataset``'s
  order, seeding and batching, with ``KptTrainTransform``)."""
  return pipeline._train_stream(  # pylint: disable=protected-access
      config, records, lambda r: KptTrainTransform(config, tokenizer, r), process_index,
      process_count, f"kptllm train pipeline (tasks {config.data.tasks}, "
      f"{config.data.shots} shots)")
