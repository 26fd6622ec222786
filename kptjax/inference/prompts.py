"""The prompts of keypoint questions, as training wrote them (``kptjax.data.conversation``).

    >>> prompts = build_prompts(tokenizer, config, ["nose"], ["the tip of the nose"])
    >>> prompts.prefix.shape, prompts.queries.shape        # (Tp,), (Q, Tq)

The prefix (``<s>`` + image header with N image slots, then the leading tokens that
every query shares, e.g. ``Keypoint: ``) is shared by every query of a crop;
``Decoder.shared`` prefills it once per person. Prefix + query is, token for token, the
training segment of that question. ``stop_token_id`` is the token
that ends an answer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import numpy as np

from kptjax import errors
from kptjax.data import conversation
from kptjax.models import vlm


@dataclasses.dataclass(frozen=True)
class Prompts:
  """Token ids of one query set, shared by every person.

  Attributes:
    prefix: int32[Tp] ``<s>`` + image header (N image placeholder slots) + the tokens
      every query starts with.
    queries: int32[Q, Tq] the rest of each keypoint question (at least its last token),
      one per row, right-padded with ``pad_id``.
    lengths: int32[Q] real length of each query row.
  """
  prefix: np.ndarray
  queries: np.ndarray
  lengths: np.ndarray

  @property
  def num_queries(self) -> int:
    return int(self.queries.shape[0])

  def full_rows(self) -> tuple[np.ndarray, np.ndarray]:
    """Prefix + query per row, right-padded: (int32[Q, Tp + Tq], int32[Q] lengths)."""
    tp = len(self.prefix)
    rows = np.concatenate([np.tile(self.prefix, (self.num_queries, 1)), self.queries], axis=1)
    return rows.astype(np.int32), (self.lengths + tp).astype(np.int32)


def build_prompts(tokenizer: Any, config: Any, names: Sequence[str],
                  descriptions: Sequence[Optional[str]], *, subject: str = "person",
                  pad_id: int = 0) -> Prompts:
  """Prefix and query tokens from ``kptjax.data.conversation`` (the training templates).

  Args:
    tokenizer: the tokenizer of the checkpoint (``kptjax.data.tokenizer``).
    config: the full config (``config.data`` picks the template, ``config.model`` the
      image tokens).
    names, descriptions: one (name, description) per query; a description may be None
      (then the template's no-description form is used).
    subject: the word the question uses for the instance (the spec's ``subject``).
  """
  if len(names) != len(descriptions):
    raise errors.ConfigError(f"{len(names)} keypoint names but {len(descriptions)} descriptions")
  if not names:
    raise errors.ConfigError("no keypoints to ask for")
  prefix = conversation.encode_prefix(tokenizer, config.data,
                                      vlm.num_image_tokens(config.model),
                                      image_token_id=int(config.model.image_token_id))
  queries = [conversation.encode_query(tokenizer, config.data, n, d, subject=subject)
             for n, d in zip(names, descriptions)]
  shared = _common_start(queries)
  prefix, queries = list(prefix) + list(queries[0][:shared]), [q[shared:] for q in queries]
  lengths = np.array([len(q) for q in queries], np.int32)
  out = np.full((len(queries), int(lengths.max())), pad_id, np.int32)
  for i, q in enumerate(queries):
    out[i, :len(q)] = q
  return Prompts(np.asarray(prefix, np.int32), out, lengths)


def _common_start(queries: Sequence[Sequence[int]]) -> int:
  """How many leading tokens all queries share, leaving each at least its last token."""
  limit = min(len(q) for q in queries) - 1
  n = 0
  while n < limit and all(q[n] == queries[0][n] for q in queries):
    n += 1
  return n


def stop_token_id(tokenizer: Any, data_config: Any) -> int:
  """The token that ends an answer in training: ``</s>``, or for the 'chat' template the
  special token closing the assistant turn (e.g. Llama-3's ``<|eot_id|>``)."""
  if data_config.template == "chat":
    end = conversation.ConversationEncoder(tokenizer, data_config, 0).end_of_turn()
    if end:
      return int(end[-1])
  if tokenizer.eos_token_id is None:
    raise errors.ConfigError("the tokenizer has no end-of-sequence token")
  return int(tokenizer.eos_token_id)
