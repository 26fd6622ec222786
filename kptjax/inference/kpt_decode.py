"""KptLLM inference: greedy decoding that reads (x, y) from the ``<keypoint>`` token, on
the one decode engine (``kptjax.inference.generate``; ``VLM.read`` adds the head's xy).

    prefill (query image tokens, prompt tokens, the round's question) -> greedy tokens
    (e.g. the keypoint's description for the visual task) -> at the first ``<keypoint>``
    the head's output at that token is the answer; when a row has not produced it after
    ``max_new_tokens - 1`` tokens, or right after it ended its turn, it is forced (so
    every row gets a position).

With ``max_new_tokens=1`` the answer is the forced ``<keypoint>`` right after the prompt:
one prefill and one step (the textual task's answer is that token alone). A plain
``VLM`` (no head: text answers, e.g. CapeLLM) decodes the same way and reports xy = 0.

Rows that ask about the same crop can share its prefix (``prefix_len``): the image
header is prefilled once per crop and stored once, as in ``kptjax.inference.decode.Decoder.shared``.

    >>> xy, tokens = generate_keypoints(model, params, images, prompt, prompt_mask,
    ...                                 prompt_embeds=p, max_new_tokens=32, eos_id=2)
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from kptjax.errors import ConfigError
from kptjax.inference.generate import bucket, pad_rows, program

Array = jax.Array

LENGTH_BUCKET = 32   # prompt lengths are trimmed to a multiple of this (fewer programs)


def generate_keypoints(model: Any, params: Any, images: Array, tokens: Array,
                       input_mask: Array, *, prompt_embeds: Optional[Array] = None,
                       max_new_tokens: int, eos_id: int, force_keypoint: bool = True,
                       prefix_len: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Greedy answers with their regressed keypoint.

  Args:
    model: ``kptjax.models.kptllm.KptLLM`` (or a plain ``VLM``); params its params.
    images: f32[B,H,W,3] query crops, one per row; with ``prefix_len``, f32[P,H,W,3]
      one per person.
    tokens: i32[B,T] prompts (right padded; N image slots, R prompt slots);
      input_mask bool[B,T].
    prompt_embeds: f32[B,R,D] from ``KptLLM.embed_prompts`` (None: no prompt slots).
    max_new_tokens: at most this many answer tokens, the last forced to ``<keypoint>``.
    eos_id: end of turn; a row that ends before ``<keypoint>`` is forced at its next step.
    force_keypoint: False for text answers (coord_format 'decimal2d', or a plain VLM):
      nothing is forced and decoding stops when every row has ended.
    prefix_len: > 0: the B = P * Q rows are person-major and all start with the same
      ``prefix_len`` tokens (the image header, no prompt slots), prefilled once per
      person and shared by its rows.

  Returns:
    (xy f32[B,2] in normalized crop units, generated i32[B,max_new_tokens]; tokens after
    the row's ``<keypoint>`` or end of turn are EOS).
  """
  tokens, input_mask = np.asarray(tokens), np.asarray(input_mask, bool)
  b = tokens.shape[0]
  lengths = input_mask.sum(axis=1).astype(np.int32)
  prefix = None
  if prefix_len:
    prefix = tokens[0, :prefix_len]
    if (tokens[:, :prefix_len] != prefix).any() or (lengths <= prefix_len).any():
      raise ConfigError(f"generate_keypoints: prefix_len={prefix_len}, but the rows do "
                        "not all start with the same prefix and a question after it")
    if b % len(images):
      raise ConfigError(f"generate_keypoints: {b} rows are not a multiple of "
                        f"{len(images)} persons")
    tokens, lengths = tokens[:, prefix_len:], lengths - prefix_len
  t = min(tokens.shape[1], -(-int(lengths.max()) // LENGTH_BUCKET) * LENGTH_BUCKET)
  persons = len(images)
  per_person = b // persons
  size = bucket(persons)
  rows = size * per_person
  run = program(model, max_new_tokens=int(max_new_tokens), eos_id=int(eos_id),
                answer_id=int(model.config.kpt.keypoint_token_id) if force_keypoint else None)
  out = run(params, jnp.asarray(pad_rows(np.asarray(images), size)),
            jnp.asarray(pad_rows(tokens[:, :t], rows)), jnp.asarray(pad_rows(lengths, rows)),
            None if prefix is None else jnp.asarray(prefix),
            None if prompt_embeds is None else jnp.asarray(pad_rows(prompt_embeds, rows)),
            None)
  generated, _, _, aux = out
  xy = np.asarray(aux["xy"])[:b] if "xy" in aux else np.zeros((b, 2), np.float32)
  return xy, np.asarray(generated)[:b]
