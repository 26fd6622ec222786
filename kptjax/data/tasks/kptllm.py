"""KptLLM's training elements: task conversations with support instances.

``TaskEncoder`` writes the three tasks' rounds (templates in ``conversation.py``,
``TASK_TEXT``), with the per-round slots the model needs beside the tokens (which
keypoint a ``<prompt>`` slot prompts, the ``<keypoint>`` regression targets)::

    >>> enc = TaskEncoder(tok, config.data, n_image, prompt_token_id=p, keypoint_token_id=k)
    >>> ex = enc.encode_task("visual", query_keypoints_crop, 224, spec, rng,
    ...                      prompt_valid=support_labeled)

``KptTaskElement`` makes one training element per item (a person / object, or one of
CapeLLM's keypoint groups): its generator picks the task from ``config.data.tasks`` and,
for the visual-prompt task, ``config.data.shots`` support instances of the same category
from other images (fresh every epoch; the fixed, seeded evaluation draw is
``cape.sample_supports``). The semantic-understanding task's support is the query crop
itself (the model names a keypoint marked on the image it sees); the textual task has
no support (its support fields are zeros with a zero mask).

Elements hold the train-batch fields plus (S = shots, R = data.rounds)::

    support_image f32[S,H,W,3]  support_xy f32[S,R,2]  support_mask f32[S,R]
    kpt_xy f32[R,2]             kpt_mask f32[R]

``support_xy[s, r]`` is the keypoint that the r-th ``<prompt>`` slot asks about, in
support s's crop (normalized: crop px / S); ``kpt_xy[r]`` the r-th ``<keypoint>`` answer.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np

from kptjax.data.conversation import (
    PROMPT_MARK,
    TASKS,
    VISUAL_TASKS,
    ConversationEncoder,
    held_out,
    pack_sequence,
    sample_rounds,
    task_text,
)
from kptjax.data.coords import config_value, format_answer
from kptjax.data.sources import specs_of
from kptjax.data.transforms import CropRecipe
from kptjax.errors import ConfigError
from kptjax.models.vlm import num_image_tokens


def parse_tasks(text: str) -> tuple[tuple[str, ...], np.ndarray]:
  """config.data.tasks -> (task names, sampling probabilities).

  ``'visual:1,textual:1'`` mixes two tasks half and half; a bare name weighs 1; ''
  means none (the plain ``ConversationEncoder`` localization).
  """
  names, weights = [], []
  for part in (text or "").split(","):
    if not part.strip():
      continue
    name, _, weight = part.partition(":")
    name = name.strip()
    if name not in TASKS:
      raise ConfigError(f"data.tasks: unknown task {name!r}; known: {TASKS}")
    names.append(name)
    weights.append(float(weight) if weight.strip() else 1.0)
  w = np.asarray(weights, np.float64)
  if names and (np.any(w < 0) or w.sum() <= 0):
    raise ConfigError(f"data.tasks={text!r}: weights must be >= 0 with a positive sum")
  return tuple(names), (w / w.sum() if names else w)


class TaskEncoder(ConversationEncoder):
  """KptLLM's three tasks (module docstring) on the prefix of a plain template.

  Args (beyond ``ConversationEncoder``'s):
    prompt_token_id: the keypoint-prompt placeholder id (config.model.kpt.prompt_token_id).
    keypoint_token_id: the ``<keypoint>`` id (config.model.kpt.keypoint_token_id);
      needed for coord_format 'keypoint_token'.

  ``encode_task`` returns the train-batch fields plus, per round slot r < cfg.rounds:
  ``prompt_index`` i32[R] (the keypoint each round asks / prompts; -1 = no round),
  ``prompt_mask`` f32[R] (1 where the round has a ``<prompt>`` slot, in order),
  ``kpt_xy`` f32[R, 2] (the answer in normalized crop units) and ``kpt_mask`` f32[R]
  (1 where the round answers with a ``<keypoint>`` token, in order).
  """

  def __init__(self, tokenizer: Any, cfg: Any, num_image_tokens: int, *,
               prompt_token_id: int, keypoint_token_id: Optional[int] = None,
               image_token_id: Optional[int] = None):
    super().__init__(tokenizer, cfg, num_image_tokens, image_token_id=image_token_id)
    if self.template == "chat":
      raise ConfigError("data.tasks need a plain template (locllm, capellm, compact)")
    if self.coord_format not in ("decimal2d", "loc_tokens", "keypoint_token"):
      raise ConfigError(f"data.tasks: coord_format {self.coord_format!r} is not 2D")
    if self.coord_format == "keypoint_token" and keypoint_token_id is None:
      raise ConfigError("coord_format 'keypoint_token' needs model.kpt.keypoint_token_id")
    self.prompt_token_id = int(prompt_token_id)
    self.keypoint_token_id = None if keypoint_token_id is None else int(keypoint_token_id)
    self.max_rounds = int(config_value(cfg, "rounds", 5))
    self.task_text = task_text(cfg)
    if self.coord_format == "loc_tokens":   # the tiny tokenizer lends <loc_98>, <loc_99>
      bins = int(config_value(cfg, "loc_bins", 100))
      locs = {f"<loc_{i}>" for i in range(bins)}
      for i in (self.prompt_token_id, self.keypoint_token_id):
        if i is not None and tokenizer.convert_ids_to_tokens(i) in locs:
          raise ConfigError(f"model.kpt token id {i} is a location token of coord_format "
                            "'loc_tokens': give the prompt / <keypoint> their own ids")

  def task_query(self, task: str, name: str, description: str = "",
                 subject: str = "person") -> list[int]:
    """One round's prompt tokens; the ``<prompt>`` slot is one placeholder token."""
    if task == "textual":
      return self.query(name, description, subject)
    head, tail = self.task_text[task]["round"].split(PROMPT_MARK)
    return (self.tokenize(head) + [self.prompt_token_id]
            + self.tokenize(tail.format(subject=subject or "person",
                                        description=description or name)))

  def task_answer(self, task: str, description: str, values: Sequence[float]) -> list[int]:
    """Answer tokens (without the end of turn) for normalized (x, y)."""
    coords = ([self.keypoint_token_id] if self.coord_format == "keypoint_token"
              else self.tokenize(format_answer(values, self.cfg)))
    head = self.task_text[task]["answer"].split("{coords}")[0].format(description=description)
    return (self.tokenize(head) if head else []) + (coords if task != "semantic" else [])

  def encode_task(self, task: str, keypoints_crop: np.ndarray,
                  crop_size: Union[int, Sequence[int]], spec: Any,
                  rng: Optional[np.random.Generator], *,
                  keypoint_ids: Optional[Sequence[int]] = None,
                  prompt_valid: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """A training sequence of ``task`` rounds (see the class docstring).

    Args:
      task: one of TASKS.
      keypoints_crop: f32[K, 3] the query crop's keypoints (x, y crop px, v).
      crop_size, spec, rng, keypoint_ids: as ``ConversationEncoder.encode``.
      prompt_valid: bool[K], keypoints the support can prompt (labeled there); rounds
        of semantic / visual tasks only ask these.
    """
    if task not in TASKS:
      raise ConfigError(f"unknown task {task!r}; known: {TASKS}")
    w, h = (crop_size, crop_size) if np.isscalar(crop_size) else crop_size
    kp = np.array(keypoints_crop, np.float32)
    if task != "textual" and prompt_valid is not None:
      kp[~np.asarray(prompt_valid, bool), -1] = 0
    chosen = sample_rounds(kp, (w, h), self.cfg, rng, keypoint_ids,
                           held_out(spec, self.cfg))[:self.max_rounds]
    subject = getattr(spec, "subject", "person")
    r_max = self.max_rounds
    prefix = self.prefix()
    tokens, is_answer = list(prefix), [False] * len(prefix)
    prompt_index = np.full((r_max,), -1, np.int32)
    kpt_xy = np.zeros((r_max, 2), np.float32)
    prompt_mask, kpt_mask = np.zeros((r_max,), np.float32), np.zeros((r_max,), np.float32)
    used = 0
    for i in chosen:
      values = (float(kp[i, 0] / w), float(kp[i, 1] / h))
      desc = spec.descriptions[i] if self.use_descriptions or task != "textual" else None
      query = self.task_query(task, spec.names[i], desc, subject)
      answer = self.task_answer(task, spec.descriptions[i], values)
      if self.max_len and len(tokens) + len(query) + len(answer) + 1 > self.max_len:
        break
      tokens += query + answer + [self.eos_id]
      is_answer += [False] * len(query) + [True] * (len(answer) + 1)
      prompt_index[used] = i
      prompt_mask[used] = float(task != "textual")
      kpt_xy[used] = np.clip(values, 0.0, 1.0)
      kpt_mask[used] = float(task != "semantic" and self.coord_format == "keypoint_token")
      used += 1
    if chosen and used == 0:
      raise ConfigError(f"data.max_len={self.max_len} is shorter than the prefix and one "
                        f"{task} round")
    out = pack_sequence(tokens, is_answer, self.max_len, self.pad_id)
    return dict(out, num_rounds=np.int32(used), prompt_index=prompt_index,
                prompt_mask=prompt_mask, kpt_xy=kpt_xy, kpt_mask=kpt_mask)


class KptTaskElement:
  """(record index, keypoint group) + rng -> one KptLLM training element (module
  docstring; picklable for grain workers)."""

  def __init__(self, config: Any, tokenizer: Any, records: Sequence[Any]):
    self.records = list(records)
    self.specs = specs_of(records)
    self.crop = CropRecipe.from_config(config)
    self.shots = int(config.data.shots)
    self.rounds = int(config.data.rounds)
    self.tasks, self.probs = parse_tasks(config.data.tasks)
    if not self.tasks:
      raise ConfigError("KptLLM training needs data.tasks (e.g. 'visual:1,textual:1')")
    kpt = config.model.kpt
    self.encoder = TaskEncoder(
        tokenizer, config.data, num_image_tokens(config.model),
        prompt_token_id=kpt.prompt_token_id, keypoint_token_id=kpt.keypoint_token_id,
        image_token_id=config.model.get("image_token_id", None))
    self.name = f"kptllm train pipeline (tasks {config.data.tasks}, {self.shots} shots)"
    self.by_spec: dict[str, list[int]] = {}
    for i, r in enumerate(self.records):
      self.by_spec.setdefault(r.spec, []).append(i)

  def _crop(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    record = self.records[index]
    crop = self.crop(record, self.specs[record.spec], rng)
    return crop["image"], crop["keypoints"]

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
    s, r, side = self.shots, self.rounds, self.crop.side
    support_image = np.zeros((s, side, side, 3), np.float32)
    support_kp = np.zeros((s, kp.shape[0], 3), np.float32)
    if task == "semantic":
      support_image[0], support_kp[0] = image, kp
    elif task in VISUAL_TASKS:
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

