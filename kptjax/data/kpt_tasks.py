"""KptLLM's task conversations: the three tasks' rounds (templates in ``conversation.py``,
``TASK_TEXT``), mixed per example by ``config.data.tasks``, with the per-round slots the
model needs beside the tokens (which keypoint a ``<prompt>`` slot prompts, the
``<keypoint>`` regression targets).

    >>> enc = TaskEncoder(tok, config.data, n_image, prompt_token_id=p, keypoint_token_id=k)
    >>> ex = enc.encode_task("visual", query_keypoints_crop, 224, spec, rng,
    ...                      prompt_valid=support_labeled)
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np

from kptjax.data.conversation import (_PROMPT_MARK, TASK_TEXT, TASKS, ConversationEncoder,
                                      _get, format_answer, sample_rounds)
from kptjax.errors import ConfigError


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
    self.max_rounds = int(_get(cfg, "rounds", 5))
    if self.coord_format == "loc_tokens":   # the tiny tokenizer lends <loc_98>, <loc_99>
      bins = int(_get(cfg, "loc_bins", 100))
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
    head, tail = TASK_TEXT[task]["round"].split(_PROMPT_MARK)
    return (self.tokenize(head) + [self.prompt_token_id]
            + self.tokenize(tail.format(subject=subject or "person")))

  def task_answer(self, task: str, description: str, values: Sequence[float]) -> list[int]:
    """Answer tokens (without the end of turn) for normalized (x, y)."""
    coords = ([self.keypoint_token_id] if self.coord_format == "keypoint_token"
              else self.tokenize(format_answer(values, self.cfg)))
    head = TASK_TEXT[task]["answer"].split("{coords}")[0].format(description=description)
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
    chosen = sample_rounds(kp, (w, h), self.cfg, rng, keypoint_ids)[:self.max_rounds]
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
    out = _pack(tokens, is_answer, self.max_len, self.pad_id)
    return dict(out, num_rounds=np.int32(used), prompt_index=prompt_index,
                prompt_mask=prompt_mask, kpt_xy=kpt_xy, kpt_mask=kpt_mask)


def _pack(tokens: list[int], is_answer: list[bool], max_len: int,
          pad_id: int) -> dict[str, np.ndarray]:
  """tokens / targets (shifted left) / loss_mask (on answer targets) / input_mask,
  padded to max_len (or the natural length when max_len is 0)."""
  n = len(tokens)
  length = max_len or n
  out_tokens = np.full((length,), pad_id, np.int32)
  out_tokens[:n] = tokens
  targets = np.full((length,), pad_id, np.int32)
  targets[:n - 1] = tokens[1:]
  loss_mask = np.zeros((length,), np.float32)
  loss_mask[:n - 1] = np.asarray(is_answer[1:], np.float32)
  input_mask = np.zeros((length,), bool)
  input_mask[:n] = True
  return dict(tokens=out_tokens, targets=targets, loss_mask=loss_mask, input_mask=input_mask)
