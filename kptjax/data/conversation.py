"""Localization conversations: templates, multi-round sampling, token sequences and loss masks.

One conversation per person crop (LocLLM, ``../shared/papers/README.md``)::

    <s>Image: <image>*N\\n
    Keypoint: {description}\\nQuestion: Where is the {name} of this person in this image? Please provide its coordinates.\\nAnswer: [0.412,0.733]</s>
    Keypoint: ...                                                     (next round)

Templates (``config.data.template``):

* ``locllm``: as above; without descriptions the ``Keypoint: ...\\n`` line is left out
  (LocLLM's ``simple`` format). ``person`` is the spec's ``subject``.
* ``capellm``: CapeLLM's public code: ``<s>`` + N image tokens + ``\\n``, then per round
  ``User: Where is the {name} of this object in this image? Please provide its
  coordinates.\\nReference: {description}\\nAssistant: `` + answer + ``</s>``.
* ``chat``: the LocLLM wording inside the tokenizer's own chat template
  (``tokenizer.apply_chat_template``); the image goes in the first user turn. The
  end-of-turn is the answer's following text up to and including the first special
  token (e.g. ``<|eot_id|>``).
* ``compact``: short sequences for CPU demos: ``<s>`` + N image tokens, then per round
  ``{name}?`` (``{description} {name}?`` with descriptions) + answer + ``</s>``.

Coordinate text (``config.data.coord_format``: decimal2d, decimal3d, loc_tokens,
keypoint_token) is written by ``kptjax.data.coords.format_answer``.

KptLLM's three tasks (``config.data.tasks``, e.g. ``'visual:1,textual:1'``; encoded by
``kptjax.data.tasks.kptllm.TaskEncoder``)
share the ``locllm`` prefix; ``<prompt>`` is one keypoint-prompt slot (filled by the
model with the support keypoint's prompt feature) and ``{coords}`` the answer above:

* ``semantic`` (keypoint semantic understanding; the image is the support image itself):
  ``Keypoint prompt: <prompt>\nQuestion: What is the keypoint of this {subject} marked by
  the prompt? Please describe it.\nAnswer: {description}</s>``
* ``visual`` (visual-prompt detection, identify-then-detect): ``Keypoint prompt:
  <prompt>\nQuestion: Where is the keypoint marked by the prompt in this image? Please
  describe it, then provide its coordinates.\nAnswer: {description} Coordinates:
  {coords}</s>``
* ``textual`` (textual-prompt detection): LocLLM's round, ``{coords}</s>``.

Segments (the prefix, each round's query, answer, end-of-turn) are tokenized
separately and concatenated, so the prompt/answer boundary is the same at training
and at decoding time: ``encode_prefix`` + ``encode_query`` is what a decoder feeds,
and the training sequence is ``prefix + query_1 + answer_1 + </s> + query_2 + ...``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np

from kptjax.data.coords import (
    COORD_FORMATS,
    DEFAULT_LOC_BINS,
    config_value,
    depth_value,
    format_answer,
    loc_token,
)
from kptjax.errors import ConfigError
from kptjax.models.vlm import num_image_tokens

TEMPLATES = ("locllm", "capellm", "chat", "compact")
TASKS = ("semantic", "visual", "textual", "visual+textual")
VISUAL_TASKS = ("visual", "visual+textual")   # tasks whose prompt slot is a support keypoint

_QUESTION = "Where is the {name} of this {subject} in this image? Please provide its coordinates."
# Per template: text before / after the N image tokens, and one round's prompt with and
# without the keypoint description. The chat template's rounds end at the question: the
# tokenizer's chat template adds the turn markers.
TEMPLATE_TEXT: dict[str, dict[str, str]] = {
    "locllm": dict(
        image_header="Image: ", image_footer="\n",
        round="Keypoint: {description}\nQuestion: " + _QUESTION + "\nAnswer: ",
        round_no_description="Question: " + _QUESTION + "\nAnswer: "),
    "capellm": dict(
        image_header="", image_footer="\n",
        round="User: " + _QUESTION.replace("{subject}", "object")
        + "\nReference: {description}\nAssistant: ",
        round_no_description="User: " + _QUESTION.replace("{subject}", "object")
        + "\nAssistant: "),
    "chat": dict(
        image_header="Image: ", image_footer="\n",
        round="Keypoint: {description}\nQuestion: " + _QUESTION,
        round_no_description="Question: " + _QUESTION),
    "compact": dict(
        image_header="", image_footer="",
        round="{description} {name}?", round_no_description="{name}?"),
}

PROMPT_MARK = "{prompt}"
# KptLLM's tasks: one round's prompt and its answer ({coords}: the coordinate answer).
TASK_TEXT: dict[str, dict[str, str]] = {
    "semantic": dict(
        round="Keypoint prompt: {prompt}\nQuestion: What is the keypoint of this {subject} "
        "marked by the prompt? Please describe it.\nAnswer: ",
        answer="{description}"),
    "visual": dict(
        round="Keypoint prompt: {prompt}\nQuestion: Where is the keypoint marked by the prompt "
        "in this image? Please describe it, then provide its coordinates.\nAnswer: ",
        answer="{description} Coordinates: {coords}"),
    "textual": dict(round=TEMPLATE_TEXT["locllm"]["round"], answer="{coords}"),
    # Table 7: the support keypoint's prompt and its description together.
    "visual+textual": dict(
        round="Keypoint prompt: {prompt}\nKeypoint: {description}\nQuestion: Where is the "
        "keypoint marked by the prompt in this image? Please describe it, then provide its "
        "coordinates.\nAnswer: ",
        answer="{description} Coordinates: {coords}"),
}
# ``data.identify_then_detect=False`` (Table 5): the detection tasks answer the
# coordinates alone, without first naming the keypoint.
DETECT_ONLY_TEXT: dict[str, dict[str, str]] = {
    "visual": dict(
        round="Keypoint prompt: {prompt}\nQuestion: Where is the keypoint marked by the prompt "
        "in this image? Please provide its coordinates.\nAnswer: ", answer="{coords}"),
    "visual+textual": dict(
        round="Keypoint prompt: {prompt}\nKeypoint: {description}\nQuestion: Where is the "
        "keypoint marked by the prompt in this image? Please provide its coordinates.\n"
        "Answer: ", answer="{coords}"),
}


def task_text(cfg: Any) -> dict[str, dict[str, str]]:
  """The task templates a config trains and asks with (``TASK_TEXT``, with
  ``DETECT_ONLY_TEXT`` in place when ``cfg.identify_then_detect`` is False)."""
  if config_value(cfg, "identify_then_detect", True):
    return TASK_TEXT
  return {**TASK_TEXT, **DETECT_ONLY_TEXT}

# Sentinels marking the image and the answers in a rendered chat template.
_IMAGE_MARK, _ANSWER_MARK = "\x00IMAGE\x00", "\x00ANSWER{}\x00"


def default_image_token_id(tokenizer: Any) -> int:
  """``<image>``'s id when the tokenizer has it (the tiny one: 4), else ``<unk>``'s (Llama: 0)."""
  vocab = tokenizer.get_vocab()
  if "<image>" in vocab:
    return int(vocab["<image>"])
  if tokenizer.unk_token_id is not None:
    return int(tokenizer.unk_token_id)
  raise ConfigError("tokenizer has neither '<image>' nor an unk token: set "
                    "config.model.image_token_id")


def pad_token_id(tokenizer: Any) -> int:
  """The padding id: the tokenizer's pad token, else its end-of-sequence token."""
  pad = tokenizer.pad_token_id
  return int(tokenizer.eos_token_id if pad is None else pad)


def held_out(spec: Any, cfg: Any) -> np.ndarray:
  """bool[K]: the keypoints of ``spec`` training never asks (``cfg.heldout_keypoints``,
  comma-separated names: LocLLM's novel-keypoint protocol, Table 7). Names must be the
  spec's; an unknown name is a ConfigError."""
  text = config_value(cfg, "heldout_keypoints", "") or ""
  names = [n.strip() for n in text.split(",") if n.strip()]
  unknown = [n for n in names if n not in spec.names]
  if unknown and not getattr(spec, "mixed", False):
    raise ConfigError(f"data.heldout_keypoints: {unknown} are not keypoints of "
                      f"{spec.name} ({', '.join(spec.names)})")
  return np.isin(np.asarray(spec.names, object), names)


def sample_rounds(keypoints_crop: np.ndarray, crop_size: Union[int, Sequence[int]], cfg: Any,
                  rng: Optional[np.random.Generator],
                  keypoint_ids: Optional[Sequence[int]] = None,
                  excluded: Optional[np.ndarray] = None) -> list[int]:
  """Which keypoints are asked, in order (LocLLM's multi-round sampling).

  Shuffle all K (``rng``; no shuffle when None), drop unlabeled (v = 0), out-of-crop and
  ``excluded`` (bool[K], e.g. ``held_out``) ones, keep the first ``cfg.rounds``. With
  ``keypoint_ids`` (CapeLLM's fixed groups) those are asked in the given order, with the
  same drops.
  """
  w, h = (crop_size, crop_size) if np.isscalar(crop_size) else crop_size
  k = np.asarray(keypoints_crop, np.float32)
  x, y, v = k[:, 0], k[:, 1], k[:, -1]
  ok = (v > 0) & (x >= 0) & (x < w) & (y >= 0) & (y < h)
  if excluded is not None:
    ok &= ~np.asarray(excluded, bool)
  if keypoint_ids is not None:
    return [int(i) for i in keypoint_ids if ok[i]]
  order = rng.permutation(k.shape[0]) if rng is not None else np.arange(k.shape[0])
  chosen = [int(i) for i in order if ok[i]]
  return chosen[:int(config_value(cfg, "rounds", 5))]


class ConversationEncoder:
  """Tokenizes conversations for one tokenizer and config, caching the repeated segments.

  Args:
    tokenizer: a ``transformers`` tokenizer (``kptjax.data.tokenizer.load_tokenizer``).
    cfg: config.data (template, coord_format, use_descriptions, rounds, max_len, loc_bins).
    num_image_tokens: N image placeholder tokens, (image_size / patch_size) ** 2.
    image_token_id: the placeholder id (config.model.image_token_id); default
      ``default_image_token_id(tokenizer)``.
  """

  def __init__(self, tokenizer: Any, cfg: Any, num_image_tokens: int, *,
               image_token_id: Optional[int] = None):
    self.tokenizer = tokenizer
    self.template = config_value(cfg, "template", "locllm")
    self.coord_format = config_value(cfg, "coord_format", "decimal2d")
    if self.template not in TEMPLATES:
      raise ConfigError(f"unknown data.template {self.template!r}; known: {TEMPLATES}")
    if self.coord_format not in COORD_FORMATS:
      raise ConfigError(f"unknown data.coord_format {self.coord_format!r}; known: "
                        f"{COORD_FORMATS}")
    self.cfg = cfg
    self.use_descriptions = bool(config_value(cfg, "use_descriptions", True))
    self.max_len = int(config_value(cfg, "max_len", 0) or 0)
    self.num_image_tokens = int(num_image_tokens)
    self.image_token_id = (default_image_token_id(tokenizer) if image_token_id is None
                           else int(image_token_id))
    self.bos_id = tokenizer.bos_token_id
    self.eos_id = int(tokenizer.eos_token_id)
    self.pad_id = pad_token_id(tokenizer)
    self.text = TEMPLATE_TEXT[self.template]
    if self.template == "chat" and not getattr(tokenizer, "chat_template", None):
      raise ConfigError("data.template 'chat' needs a tokenizer with a chat template")
    if self.coord_format == "loc_tokens":
      bins = int(config_value(cfg, "loc_bins", DEFAULT_LOC_BINS))
      vocab = tokenizer.get_vocab()
      if loc_token(bins - 1) not in vocab:
        raise ConfigError(f"coord_format 'loc_tokens' needs tokens <loc_0>..<loc_{bins - 1}>: "
                          f"load the tokenizer with load_tokenizer(path, loc_bins={bins})")
    self._cache: dict[str, list[int]] = {}
    self._backend = self._same_backend()

  # -- segments -------------------------------------------------------------------------

  def _same_backend(self) -> Any:
    """The Rust tokenizer under a fast tokenizer (its ``encode`` costs ~1/4 of the
    transformers wrapper's), if it gives the wrapper's ids on this template's texts and
    on answers; else None."""
    backend = getattr(self.tokenizer, "backend_tokenizer", None)
    if backend is None:
      return None
    probes = [t for t in self.text.values() if t]
    probes += ["[0.412,0.733]", "[0.412,0.733,-0.051]", " left wrist?", "Answer: [1.000,0.0"]
    same = all(backend.encode(t, add_special_tokens=False).ids
               == list(self.tokenizer.encode(t, add_special_tokens=False)) for t in probes)
    return backend if same else None

  def tokenize(self, text: str) -> list[int]:
    """Token ids of one text segment (no special tokens added), cached."""
    ids = self._cache.get(text)
    if ids is None:
      if self._backend is not None:
        ids = self._backend.encode(text, add_special_tokens=False).ids
      else:
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
      if len(self._cache) < 100_000:
        self._cache[text] = ids
    return ids

  def round_text(self, name: str, description: str = "", subject: str = "person") -> str:
    """One round's prompt text (up to and including ``Answer: `` for locllm)."""
    key = "round" if (self.use_descriptions and description is not None) else \
        "round_no_description"
    return self.text[key].format(name=name, description=description or name,
                                 subject=subject or "person")

  def prefix(self) -> list[int]:
    """``<s>`` + image header: the part every query of a crop shares."""
    if self.template == "chat":
      return self._chat([("Q", None)])[0]
    ids = [] if self.bos_id is None else [int(self.bos_id)]
    ids += self.tokenize(self.text["image_header"]) if self.text["image_header"] else []
    ids += [self.image_token_id] * self.num_image_tokens
    ids += self.tokenize(self.text["image_footer"]) if self.text["image_footer"] else []
    return ids

  def query(self, name: str, description: str = "", subject: str = "person") -> list[int]:
    """One round's prompt tokens as the first round after the prefix."""
    text = self.round_text(name, description, subject)
    if self.template == "chat":
      return self._chat([(text, None)])[1][0][0]
    return self.tokenize(text)

  def answer(self, values: Sequence[float]) -> tuple[list[int], list[int]]:
    """(answer tokens, end-of-turn tokens) for normalized values."""
    return self.tokenize(format_answer(values, self.cfg)), [self.eos_id]

  # -- chat templates -------------------------------------------------------------------

  def end_of_turn(self) -> list[int]:
    """The tokens that close an assistant answer: the chat template's end of turn
    (e.g. Llama-3's ``<|eot_id|>``; [] when it has none), else ``</s>``."""
    if self.template == "chat":
      return list(self._chat([("q", "a")])[1][0][2])
    return [self.eos_id]

  def _chat(self, rounds: list[tuple[str, Optional[str]]]):
    """Renders the tokenizer's chat template around sentinels and tokenizes segments.

    Returns (prefix ids, [(query ids, answer ids, end-of-turn ids)], trailing ids).
    """
    messages = []
    for i, (text, _) in enumerate(rounds):
      content = text if i else (self.text["image_header"] + _IMAGE_MARK
                                + self.text["image_footer"] + text)
      messages += [dict(role="user", content=content),
                   dict(role="assistant", content=_ANSWER_MARK.format(i))]
    rendered = self.tokenizer.apply_chat_template(messages, tokenize=False)
    head, rest = rendered.split(_IMAGE_MARK, 1)
    prefix = self.tokenize(head) + [self.image_token_id] * self.num_image_tokens
    specials = sorted({s for s in self.tokenizer.all_special_tokens if s}, key=len,
                      reverse=True)
    segments = []
    for i, (_, answer) in enumerate(rounds):
      mark = _ANSWER_MARK.format(i)
      query_text, rest = rest.split(mark, 1)
      window = rest.split(_ANSWER_MARK.format(i + 1), 1)[0]
      # End of turn: up to and including the first special token after the answer
      # (none found: no end-of-turn tokens).
      hits = [(window.find(s), -len(s)) for s in specials if s in window]
      cut = min(hits)[0] - min(hits)[1] if hits else 0
      segments.append((self.tokenize(query_text),
                       [] if answer is None else self.tokenize(answer),
                       self.tokenize(rest[:cut]) if cut else []))
      rest = rest[cut:]
    return prefix, segments, self.tokenize(rest) if rest else []

  # -- training examples ----------------------------------------------------------------

  def encode(self, keypoints_crop: np.ndarray, crop_size: Union[int, Sequence[int]],
             spec: Any, rng: Optional[np.random.Generator],
             keypoint_ids: Optional[Sequence[int]] = None) -> dict[str, np.ndarray]:
    """A training sequence; see ``encode_training_example``."""
    w, h = (crop_size, crop_size) if np.isscalar(crop_size) else crop_size
    kp = np.asarray(keypoints_crop, np.float32)
    chosen = sample_rounds(kp, (w, h), self.cfg, rng, keypoint_ids, held_out(spec, self.cfg))
    subject = getattr(spec, "subject", "person")
    rounds = []
    for i in chosen:
      values = [kp[i, 0] / w, kp[i, 1] / h]
      if self.coord_format == "decimal3d":
        if kp.shape[1] < 4:
          raise ConfigError("coord_format 'decimal3d' needs keypoints [K, 4] (x, y, z_rel, v)")
        values.append(depth_value(kp[i, 2]))
      desc = spec.descriptions[i] if self.use_descriptions else None
      rounds.append((self.round_text(spec.names[i], desc, subject),
                     format_answer(values, self.cfg)))
    if self.template == "chat":
      prefix, segs, trailing = self._chat(rounds) if rounds else (self.prefix(), [], [])
    else:
      prefix, trailing = self.prefix(), []
      segs = [(self.tokenize(q), self.tokenize(a), [self.eos_id]) for q, a in rounds]
    tokens, is_answer = list(prefix), [False] * len(prefix)
    used = 0
    for query, answer, eot in segs:
      n = len(query) + len(answer) + len(eot)
      if self.max_len and len(tokens) + n > self.max_len:
        break
      tokens += query + answer + eot
      is_answer += [False] * len(query) + [True] * (len(answer) + len(eot))
      used += 1
    if segs and used == 0:
      raise ConfigError(f"data.max_len={self.max_len} is shorter than the prefix and one "
                        f"round ({len(prefix) + sum(map(len, segs[0]))} tokens)")
    if trailing and used == len(segs) and (not self.max_len
                                           or len(tokens) + len(trailing) <= self.max_len):
      tokens += trailing
      is_answer += [False] * len(trailing)
    return dict(pack_sequence(tokens, is_answer, self.max_len, self.pad_id),
                num_rounds=np.int32(used))


def pack_sequence(tokens: Sequence[int], is_answer: Sequence[bool], max_len: int,
                  pad_id: int) -> dict[str, np.ndarray]:
  """One training sequence in the batch contract, padded to ``max_len`` (0: its length T).

  Returns:
    ``tokens`` i32[T]; ``targets`` i32[T] (tokens shifted left by one, pad at the end);
    ``loss_mask`` f32[T] (1 where the target is an answer token); ``input_mask`` bool[T].
  """
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


def encoder_for(config: Any, tokenizer: Any) -> ConversationEncoder:
  """The encoder of a full config: ``config.data``, the model's N image tokens
  (``kptjax.models.vlm.num_image_tokens``) and its ``image_token_id``."""
  return ConversationEncoder(tokenizer, config.data, num_image_tokens(config.model),
                             image_token_id=config.model.get("image_token_id", None))


def encode_training_example(keypoints_crop: np.ndarray, crop_size: Union[int, Sequence[int]],
                            spec: Any, tokenizer: Any, cfg: Any, num_image_tokens: int,
                            rng: Optional[np.random.Generator], *,
                            image_token_id: Optional[int] = None,
                            keypoint_ids: Optional[Sequence[int]] = None
                            ) -> dict[str, np.ndarray]:
  """One person's multi-round training sequence.

  Args:
    keypoints_crop: f32[K, 3] (x, y crop px, v), or f32[K, 4] (x, y, z_cam - z_root in
      mm, v) for decimal3d.
    crop_size: crop side in px (or (w, h)).
    spec: the KeypointSpec (names, descriptions, subject).
    tokenizer: the tokenizer.
    cfg: config.data.
    num_image_tokens: N image placeholder slots.
    rng: shuffles the rounds (None: keypoint order).
    image_token_id: placeholder id (config.model.image_token_id).
    keypoint_ids: ask exactly these keypoints in this order (CapeLLM groups).

  Returns:
    ``tokens`` i32[T], ``targets`` i32[T] (tokens shifted left by one; pad at the end),
    ``loss_mask`` f32[T] (1 where the target is an answer token or its end-of-turn),
    ``input_mask`` bool[T] (real tokens), ``num_rounds`` i32. T = cfg.max_len (rounds
    that do not fit are dropped whole), or the natural length when max_len is 0.
  """
  enc = ConversationEncoder(tokenizer, cfg, num_image_tokens, image_token_id=image_token_id)
  return enc.encode(keypoints_crop, crop_size, spec, rng, keypoint_ids)


def encode_prefix(tokenizer: Any, cfg: Any, num_image_tokens: int, *,
                  image_token_id: Optional[int] = None) -> list[int]:
  """``<s>`` + image header: the part every query of one crop shares."""
  return ConversationEncoder(tokenizer, cfg, num_image_tokens,
                             image_token_id=image_token_id).prefix()


def encode_query(tokenizer: Any, cfg: Any, name: str, description: str = "", *,
                 subject: str = "person") -> list[int]:
  """One round's prompt tokens (locllm: ``Keypoint: ...`` up to and including ``Answer: ``)."""
  return ConversationEncoder(tokenizer, cfg, 0).query(name, description, subject)
