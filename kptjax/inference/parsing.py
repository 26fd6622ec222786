"""Answer text <-> coordinates: parsing, confidences, and the coordinate grammar.

An answer is a coordinate string such as ``[0.412,0.733]`` (decimal2d) or
``[0.412,0.733,0.512345]`` (decimal3d) followed by the end-of-sequence token.
Values are normalized crop coordinates: pixel / crop side (x, y) and, for 3D,
``(z_cam - z_root) / 2000 + 0.5`` (z in millimetres).

Three jobs live here because they share one fact, the answer's shape:

* :func:`parse_values` finds the values with LocLLM's regex ``0\\.\\d+`` (the first
  ``num_values`` matches are used, extra ones ignored; fewer is a parse failure).
* :func:`score_answer` gives the LocLLM confidence: per value, the mean over the
  tokens that spell the matched number (``0``, ``.``, digits) of the probability of
  the emitted token (= the max softmax probability under greedy decoding); the
  keypoint score is the mean over its values. An unparseable answer scores 0.
* :class:`CoordinateGrammar` is a token-level automaton built from the tokenizer's
  vocabulary that only allows tokens continuing a valid coordinate string, so
  constrained decoding always yields a parseable answer.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Optional, Sequence

import numpy as np

from kptjax import errors
from kptjax.data.coords import DEPTH_RANGE_MM
from kptjax.data.transforms import apply_affine

COORD_RE = re.compile(r"0\.\d+")

# Answer shapes: literal characters, 'd' = any digit. The optional leading space is
# allowed by the grammar separately (SentencePiece tokenizers spell '[' as ' [').
ANSWER_SHAPES = {
    "decimal2d": "[0.ddd,0.ddd]",
    "decimal3d": "[0.ddd,0.ddd,0.dddddd]",
}

def num_values(coord_format: str) -> int:
  """Number of values in an answer of ``coord_format`` (2 or 3)."""
  if coord_format == "loc_tokens":
    return 2
  if coord_format not in ANSWER_SHAPES:
    raise errors.ConfigError(
        f"decoding supports coord_format in {sorted(ANSWER_SHAPES)}, got '{coord_format}'")
  return ANSWER_SHAPES[coord_format].count(",") + 1


def shape_from_example(answer: str) -> str:
  """Answer shape from one formatted answer: '[0.500,0.250]' -> '[0.ddd,0.ddd]'.

  Everything after the closing bracket (an end-of-turn marker) is dropped.
  """
  answer = answer.strip()
  if "]" in answer:
    answer = answer[:answer.index("]") + 1]
  return re.sub(r"0\.(\d+)", lambda m: "0." + "d" * len(m.group(1)), answer)


# ---------------------------------------------------------------------------
# Parsing and confidence.


@dataclasses.dataclass
class ParsedAnswer:
  """One decoded answer.

  Attributes:
    values: float32[D] normalized crop coordinates (0 where missing).
    score: LocLLM confidence in [0, 1]; 0 when unparseable.
    ok: whether ``D`` values were found.
    text: the answer text (tokens before end-of-sequence).
  """
  values: np.ndarray
  score: float
  ok: bool
  text: str


def parse_values(text: str, count: int) -> tuple[Optional[np.ndarray], list[tuple[int, int]]]:
  """First ``count`` matches of ``0\\.\\d+`` in ``text``.

  Returns:
    (float32[count] values, their character spans), or (None, spans found) if fewer
    than ``count`` numbers are present.
  """
  matches = list(COORD_RE.finditer(text))[:count]
  spans = [m.span() for m in matches]
  if len(matches) < count:
    return None, spans
  return np.array([float(m.group()) for m in matches], np.float32), spans


def score_answer(tokens: Sequence[int], probs: Sequence[float], token_strs: Sequence[Optional[str]],
                 eos_id: int, count: int) -> ParsedAnswer:
  """Parses one generated answer and computes its LocLLM confidence.

  Args:
    tokens: generated token ids (the answer, possibly followed by EOS and padding).
    probs: for each generated token the softmax probability of that token.
    token_strs: surface string of every token id (:func:`token_strings`).
    eos_id: end-of-sequence id; generation stops there.
    count: values expected (2 for 2D, 3 for 3D).
  """
  pieces, owners = [], []
  for i, t in enumerate(tokens):
    t = int(t)
    if t == eos_id:
      break
    s = token_strs[t] if 0 <= t < len(token_strs) else None
    s = s if s is not None else ""
    pieces.append(s)
    owners.extend([i] * len(s))
  text = "".join(pieces)
  values, spans = parse_values(text, count)
  if values is None:
    return ParsedAnswer(np.zeros(count, np.float32), 0.0, False, text)
  value_scores = []
  for start, end in spans:
    idx = sorted(set(owners[start:end]))
    value_scores.append(float(np.mean([float(probs[i]) for i in idx])))
  return ParsedAnswer(values, float(np.mean(value_scores)), True, text)


def to_image_coords(values: np.ndarray, affine_inv: np.ndarray, crop_size: float) -> np.ndarray:
  """Normalized crop (x, y) -> original-image pixels.

  Args:
    values: float[..., D] normalized values; the first two are x, y in crop / crop_size.
    affine_inv: float[2, 3] crop pixels -> original pixels.
    crop_size: crop side in pixels.
  Returns:
    float32[..., 2] pixel coordinates in the original image.
  """
  return apply_affine(np.asarray(values, np.float64)[..., :2] * crop_size, affine_inv)


def depth_from_value(z: np.ndarray) -> np.ndarray:
  """Normalized depth value -> root-relative depth in millimetres."""
  return ((np.asarray(z, np.float64) - 0.5) * DEPTH_RANGE_MM).astype(np.float32)


# ---------------------------------------------------------------------------
# Token surface strings.


def _vocab_size(tokenizer: Any) -> int:
  if hasattr(tokenizer, "get_vocab_size"):            # tokenizers.Tokenizer
    return int(tokenizer.get_vocab_size(with_added_tokens=True))
  return int(len(tokenizer))                           # transformers tokenizer


def _special_ids(tokenizer: Any) -> set[int]:
  if hasattr(tokenizer, "all_special_ids"):
    return set(int(i) for i in tokenizer.all_special_ids)
  if hasattr(tokenizer, "get_added_tokens_decoder"):
    return {int(i) for i, tok in tokenizer.get_added_tokens_decoder().items() if tok.special}
  return set()


def _batch_decode(tokenizer: Any, seqs: list[list[int]]) -> list[str]:
  if hasattr(tokenizer, "decode_batch"):
    return tokenizer.decode_batch(seqs, skip_special_tokens=False)
  return tokenizer.batch_decode(seqs, skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)


def _encode(tokenizer: Any, text: str) -> list[int]:
  out = tokenizer.encode(text, add_special_tokens=False)
  return list(out.ids) if hasattr(out, "ids") else list(out)


def token_strings(tokenizer: Any, vocab_size: Optional[int] = None) -> list[Optional[str]]:
  """Surface string of every token id as it appears inside a text.

  Decodes ``[anchor, id]`` and strips the anchor's text, so a SentencePiece
  ``'▁['`` becomes ``' ['`` (a lone-token decode would drop the space). Special tokens
  and ids beyond the tokenizer (model vocab padding) map to None.

  Args:
    tokenizer: a ``tokenizers.Tokenizer`` or a transformers tokenizer.
    vocab_size: the model's vocabulary size (>= the tokenizer's); default the tokenizer's.
  """
  n_tok = _vocab_size(tokenizer)
  vocab_size = vocab_size or n_tok
  anchor = _encode(tokenizer, "0")[-1]
  anchor_text = _batch_decode(tokenizer, [[anchor]])[0]
  ids = list(range(min(n_tok, vocab_size)))
  texts = _batch_decode(tokenizer, [[anchor, i] for i in ids])
  special = _special_ids(tokenizer)
  out: list[Optional[str]] = [None] * vocab_size
  for i, text in zip(ids, texts):
    if i in special:
      continue
    out[i] = text[len(anchor_text):] if text.startswith(anchor_text) else text
  return out


# ---------------------------------------------------------------------------
# The coordinate grammar (constrained decoding).


@dataclasses.dataclass(frozen=True)
class CoordinateGrammar:
  """Token automaton of valid answers: ``[ ' ' ] shape </s>``.

  Attributes:
    transitions: int32[S, V] next state after emitting a token, -1 if not allowed.
    start: initial state.
    accept: state after the whole shape (only EOS allowed there).
    shape: the answer shape ('[0.ddd,0.ddd]', or '<loc><loc>').
    max_tokens: tokens any path needs at most to emit EOS (a decoding budget that
      guarantees a finished answer).
  """
  transitions: np.ndarray
  start: int
  accept: int
  shape: str
  max_tokens: int

  @property
  def num_states(self) -> int:
    return int(self.transitions.shape[0])


def build_grammar(token_strs: Sequence[Optional[str]], shape: str, eos_id: int) -> CoordinateGrammar:
  """Builds the token automaton for answers of ``shape`` ('d' = digit).

  Character states: ``L = len(shape)``; state ``p`` in [0, L] means ``p`` characters of
  the shape were written; ``L + 1`` is the start (a single leading space allowed);
  ``L + 2`` is done (after EOS; EOS repeats as padding). A token is allowed in a state
  when all its characters continue the shape.

  Raises:
    ConfigError: when some character of the shape has no single token and no
      multi-character token covers it (the grammar could dead-end).
  """
  length = len(shape)
  start, done = length + 1, length + 2
  num_states = length + 3
  vocab = len(token_strs)

  def step(p: int, ch: str) -> int:
    if p == start:
      if ch == " ":
        return 0
      p = 0
    if p >= length:
      return -1
    want = shape[p]
    ok = ch.isdigit() and ch.isascii() if want == "d" else ch == want
    return p + 1 if ok else -1

  trans = np.full((num_states, vocab), -1, np.int32)
  for tok, s in enumerate(token_strs):
    if not s:
      continue
    for state in range(length + 2):
      p = state
      for ch in s:
        p = step(p, ch)
        if p < 0:
          break
      if p >= 0 and p != start:
        trans[state, tok] = p
  trans[length, eos_id] = done
  trans[done, eos_id] = done
  # Every state reachable from the start must still reach the accept state.
  for p in range(length):
    if not (trans[p] >= 0).any():
      raise errors.ConfigError(
          f"no token can write character {p} ('{shape[p]}') of answer shape '{shape}'")
  # Worst case: a leading space, one token per character, EOS.
  return CoordinateGrammar(trans, start, length, shape, length + 2)


def build_loc_grammar(loc_ids: Sequence[int], vocab_size: int, eos_id: int,
                      count: int = 2) -> CoordinateGrammar:
  """Automaton of ``count`` location tokens then EOS (coord_format 'loc_tokens')."""
  trans = np.full((count + 2, vocab_size), -1, np.int32)
  for state in range(count):
    trans[state, np.asarray(loc_ids, np.int64)] = state + 1
  trans[count, eos_id] = count + 1
  trans[count + 1, eos_id] = count + 1
  return CoordinateGrammar(trans, 0, count, "<loc>" * count, count + 1)


def loc_token_bins(tokenizer: Any) -> dict[int, int]:
  """{token id: bin} of the tokenizer's ``<loc_i>`` tokens."""
  out = {}
  for token, idx in tokenizer.get_vocab().items():
    m = re.fullmatch(r"<loc_(\d+)>", token)
    if m:
      out[int(idx)] = int(m.group(1))
  return out


def score_loc_answer(tokens: Sequence[int], probs: Sequence[float], bins_by_id: dict[int, int],
                     eos_id: int, loc_bins: int, count: int = 2) -> ParsedAnswer:
  """Location-token answer: values = bin centers (bin + 0.5) / loc_bins of the first
  ``count`` ``<loc_i>`` tokens; score = mean probability of those tokens."""
  found, scores = [], []
  for t, p in zip(tokens, probs):
    t = int(t)
    if t == eos_id:
      break
    if t in bins_by_id:
      found.append(bins_by_id[t])
      scores.append(float(p))
  text = "".join(f"<loc_{b}>" for b in found)
  if len(found) < count:
    return ParsedAnswer(np.zeros(count, np.float32), 0.0, False, text)
  values = (np.asarray(found[:count], np.float32) + 0.5) / loc_bins
  return ParsedAnswer(values, float(np.mean(scores[:count])), True, text)


# ---------------------------------------------------------------------------
# Batches.


@dataclasses.dataclass
class Localization:
  """Parsed answers of P persons x Q queries.

  A keypoint is a number or it is missing: ``missing[i, j]`` marks an answer that did not
  parse. Values of missing entries are 0 (never NaN or inf) and must not be used.

  Attributes:
    values: f32[P, Q, D] normalized crop values (D = 2 or 3; 0 where missing).
    keypoints: f32[P, Q, 2] original-image pixels (0 where missing).
    depth: f32[P, Q] root-relative depth in mm (3D answers; 0 where missing), else None.
    scores: f32[P, Q] keypoint confidences (0 where missing).
    missing: bool[P, Q] no answer (unparseable).
    texts: P lists of Q answer texts.
  """
  values: np.ndarray
  keypoints: np.ndarray
  depth: Optional[np.ndarray]
  scores: np.ndarray
  missing: np.ndarray
  texts: list[list[str]]

  @property
  def ok(self) -> np.ndarray:
    """bool[P, Q]: answered (``~missing``)."""
    return ~self.missing

  @property
  def person_scores(self) -> np.ndarray:
    """f32[P]: mean keypoint score (LocLLM; a missing keypoint scores 0)."""
    return self.scores.mean(axis=1)

  @property
  def num_failures(self) -> int:
    return int(self.missing.sum())


def localize(tokens: np.ndarray, probs: np.ndarray,
             scorer: Callable[[np.ndarray, np.ndarray], ParsedAnswer],
             count: int, affine_inv: np.ndarray, crop_size: float) -> Localization:
  """Parses decoder outputs and maps the answered ones back to the original images.

  Args:
    tokens: int32[P, Q, M]; probs: f32[P, Q, M] (``kptjax.inference.decode.Decoder``).
    scorer: (tokens[M], probs[M]) -> ParsedAnswer, e.g. ``score_answer`` with its
      token strings, EOS id and value count bound.
    count: values per answer (2 or 3).
    affine_inv: f32[P, 2, 3] crop pixels -> original pixels, per person.
    crop_size: crop side in pixels.
  """
  p, q = tokens.shape[:2]
  values = np.zeros((p, q, count), np.float32)
  scores = np.zeros((p, q), np.float32)
  missing = np.zeros((p, q), bool)
  texts = []
  for i in range(p):
    row_texts = []
    for j in range(q):
      ans = scorer(tokens[i, j], probs[i, j])
      if ans.ok:
        values[i, j], scores[i, j] = ans.values, ans.score
      missing[i, j] = not ans.ok
      row_texts.append(ans.text)
    texts.append(row_texts)
  keypoints = np.stack([to_image_coords(values[i], affine_inv[i], crop_size) for i in range(p)])
  keypoints = np.where(missing[..., None], 0.0, keypoints.reshape(p, q, 2)).astype(np.float32)
  depth = None
  if count == 3:
    depth = np.where(missing, 0.0, depth_from_value(values[..., 2])).astype(np.float32)
  return Localization(values, keypoints, depth, scores, missing, texts)
