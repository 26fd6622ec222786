"""KptLLM inference: greedy decoding that reads (x, y) from the ``<keypoint>`` token.

    prefill (query image tokens, prompt tokens, the round's question) -> greedy tokens
    (e.g. the keypoint's description for the visual task) -> at the first ``<keypoint>``
    the head's output at that token is the answer; when a row has not produced it after
    ``max_new_tokens - 1`` tokens it is forced (so every row gets a position).

With ``max_new_tokens=1`` the answer is the forced ``<keypoint>`` right after the prompt:
one prefill and one step (the textual task's answer is that token alone).

    >>> xy, tokens = generate_keypoints(model, params, images, prompt, prompt_mask,
    ...                                 prompt_embeds=p, max_new_tokens=32, eos_id=2)
"""

from __future__ import annotations

import json
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from kptjax.models import vlm

Array = jax.Array


class _Programs:
  """Jitted prefill and step of one model (closures over it: Linen modules holding a
  ConfigDict do not hash, so they cannot be static arguments). A plain ``VLM`` (no
  head: text answers, e.g. CapeLLM) runs through ``extend`` and reports xy = 0."""

  def __init__(self, model):
    self.model = model
    self.has_head = hasattr(model, "extend_keypoints")
    self.prefill = jax.jit(self._prefill)
    self.step = jax.jit(self._step, donate_argnums=(2,))

  def _extend(self, params, tokens, mask, cache, image_embeds=None, prompt_embeds=None):
    if self.has_head:
      return self.model.apply({"params": params}, tokens, mask, cache,
                              image_embeds=image_embeds, prompt_embeds=prompt_embeds,
                              method="extend_keypoints")
    logits, cache = self.model.apply({"params": params}, tokens, mask, cache,
                                     image_embeds=image_embeds, method="extend")
    return logits, jnp.zeros(tokens.shape + (2,), jnp.float32), cache

  def _prefill(self, params, images, tokens, mask, cache, prompt_embeds):
    image_embeds = self.model.apply({"params": params}, images, method="embed_image")
    return self._extend(params, tokens, mask, cache, image_embeds, prompt_embeds)

  def _step(self, params, token, cache):
    logits, xy, cache = self._extend(params, token[:, None],
                                     jnp.ones((token.shape[0], 1), bool), cache)
    return logits[:, 0], xy[:, 0], cache


_PROGRAMS: dict[str, _Programs] = {}


def _programs(model) -> _Programs:
  key = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
  if key not in _PROGRAMS:
    _PROGRAMS[key] = _Programs(model)
  return _PROGRAMS[key]


def generate_keypoints(model: Any, params: Any, images: Array, tokens: Array,
                       input_mask: Array, *, prompt_embeds: Optional[Array] = None,
                       max_new_tokens: int, eos_id: int, force_keypoint: bool = True
                       ) -> tuple[np.ndarray, np.ndarray]:
  """Greedy answers with their regressed keypoint.

  Args:
    model: ``kptjax.models.kptllm.KptLLM``; params its params.
    images: f32[B,H,W,3] query crops; tokens i32[B,T] prompts (right padded; N image
      slots, R prompt slots); input_mask bool[B,T].
    prompt_embeds: f32[B,R,D] from ``KptLLM.embed_prompts`` (None: no prompt slots).
    max_new_tokens: at most this many answer tokens, the last forced to ``<keypoint>``.
    eos_id: end of turn; a row that ends before ``<keypoint>`` is forced at its next step.
    force_keypoint: False for text answers (coord_format 'decimal2d', or a plain VLM):
      nothing is forced and decoding stops when every row has ended.

  Returns:
    (xy f32[B,2] in normalized crop units, generated i32[B,max_new_tokens]; tokens after
    the row's ``<keypoint>`` or end are the greedy continuation, to be ignored).
  """
  kpt_id = int(model.config.kpt.keypoint_token_id) if force_keypoint else -1
  b, t = tokens.shape
  cache = vlm.init_cache(model.config, b, t + max_new_tokens, jnp.float32)
  programs = _programs(model)
  logits, _, cache = programs.prefill(params, images, tokens, input_mask, cache, prompt_embeds)
  last = jnp.take_along_axis(logits, (jnp.sum(input_mask, 1) - 1)[:, None, None], 1)[:, 0]
  xy = np.zeros((b, 2), np.float32)
  done = np.zeros((b,), bool)
  generated = np.zeros((b, max_new_tokens), np.int32)
  ended = np.zeros((b,), bool)
  for i in range(max_new_tokens):
    token = np.asarray(jnp.argmax(last, axis=-1)).astype(np.int32)
    force = ~done & (ended | (i == max_new_tokens - 1)) & force_keypoint
    token = np.where(force, kpt_id, token)
    generated[:, i] = token
    last, step_xy, cache = programs.step(params, jnp.asarray(token), cache)
    hit = ~done & (token == kpt_id)
    xy[hit] = np.asarray(step_xy)[hit]
    done |= hit
    ended |= token == eos_id
    if done.all() or (not force_keypoint and ended.all()):
      break
  return xy, generated
