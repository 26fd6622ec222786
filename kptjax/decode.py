"""Jitted greedy decoding of keypoint answers with an explicit KV cache.

The fast path (``Decoder.shared``), per batch of P persons and Q keypoint queries:

  1. each crop is encoded once: ``embed_image`` -> f32[P, N, D];
  2. the shared prefix (``<s>`` + image header with N image slots) is prefilled once
     per person into a cache of P rows;
  3. that cache is broadcast to P*Q rows and the Q query suffixes (right-padded) are
     prefilled in one ``extend``;
  4. a ``lax.while_loop`` of ``decode_step`` runs until every row emitted EOS or
     ``max_new_tokens`` were written (static).

Steps 1-4 are one jitted program, so the cache never crosses a jit boundary: XLA
updates it in place inside the loop (what donation achieves between programs).
Memory: P*Q cache rows of length Tp + Tq + M (the prefix is copied per query row).
The image placeholder id is never generated (its embedding is only filled in prompts).

The slow path (``Decoder.rows``) is LocLLM's: one full sequence per (person, keypoint)
row, the image encoded for every row. ``reference_greedy`` recomputes the full forward
for every new token (no cache) and is the ground truth of the tests.

Greedy picks ``argmax(logits)``; with a ``CoordinateGrammar`` (constrained decoding)
the argmax runs over the tokens the grammar allows in each row's state, so every
answer parses. Along with each token the loop records its probability under the
unconstrained softmax (= the max probability for plain greedy), which
``kptjax.parsing.score_answer`` turns into the LocLLM confidence.

Shapes: P persons, Q queries, B = rows, T tokens, M = max_new_tokens, V vocabulary,
S = cache length, (H, W) crop pixels.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kptjax import errors, parsing

Array = jax.Array


# ---------------------------------------------------------------------------
# Prompts.


@dataclasses.dataclass(frozen=True)
class Prompts:
  """Token ids of one query set, shared by every person.

  Attributes:
    prefix: int32[Tp] ``<s>`` + image header (N image placeholder slots).
    queries: int32[Q, Tq] one keypoint question per row, right-padded with ``pad_id``.
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
  from kptjax.data import conversation
  if len(names) != len(descriptions):
    raise errors.ConfigError(f"{len(names)} keypoint names but {len(descriptions)} descriptions")
  if not names:
    raise errors.ConfigError("no keypoints to ask for")
  prefix = conversation.encode_prefix(tokenizer, config.data,
                                      conversation.num_image_tokens(config.model),
                                      image_token_id=int(config.model.image_token_id))
  queries = [conversation.encode_query(tokenizer, config.data, n, d, subject=subject)
             for n, d in zip(names, descriptions)]
  lengths = np.array([len(q) for q in queries], np.int32)
  out = np.full((len(queries), int(lengths.max())), pad_id, np.int32)
  for i, q in enumerate(queries):
    out[i, :len(q)] = q
  return Prompts(np.asarray(prefix, np.int32), out, lengths)


# ---------------------------------------------------------------------------
# The model, seen through its four entry points.


def _embed_image(model, params, images):
  return model.apply({"params": params}, images, method=model.embed_image)


def _extend(model, params, tokens, mask, cache, image_embeds=None):
  return model.apply({"params": params}, tokens, mask, cache, image_embeds=image_embeds,
                     method=model.extend)


def _decode_step(model, params, token, cache):
  return model.apply({"params": params}, token, cache, method=model.decode_step)


def _init_cache(model, batch, max_len, dtype):
  from kptjax.models import vlm
  return vlm.init_cache(model.config, batch, max_len, dtype)


# ---------------------------------------------------------------------------
# The greedy loop.


def _pick(logits: Array, state: Array, transitions: Optional[Array], bias: Optional[Array]):
  """Greedy token (grammar-masked when given) and its probability without the grammar."""
  logits = logits.astype(jnp.float32)
  if bias is not None:
    logits = logits + bias
  if transitions is not None:
    allowed = transitions[state] >= 0                   # [B, V]
    token = jnp.argmax(jnp.where(allowed, logits, -jnp.inf), axis=-1)
    state = jnp.take_along_axis(transitions[state], token[:, None], axis=1)[:, 0]
  else:
    token = jnp.argmax(logits, axis=-1)
  logp = jax.nn.log_softmax(logits, axis=-1)
  prob = jnp.exp(jnp.take_along_axis(logp, token[:, None], axis=1)[:, 0])
  return token.astype(jnp.int32), prob, state


def greedy_loop(step_fn, logits: Array, cache: Any, *, max_new_tokens: int, eos_id: int,
                transitions: Optional[Array] = None, grammar_start: int = 0,
                bias: Optional[Array] = None):
  """Greedy decoding from the next-token ``logits`` f32[B, V] of a prefilled cache.

  Args:
    step_fn: (token i32[B], cache) -> (logits f32[B, V], cache).
    max_new_tokens: M, static.
    transitions: optional int32[S, V] grammar (``parsing.CoordinateGrammar``).
    bias: optional f32[V] added to the logits (-inf suppresses a token everywhere).
  Returns:
    tokens int32[B, M] (EOS after the end), probs f32[B, M] (1 after the end),
    lengths int32[B] tokens up to and including EOS (M if none).
  """
  b = logits.shape[0]
  init = dict(i=jnp.int32(0), logits=logits, cache=cache,
              tokens=jnp.full((b, max_new_tokens), eos_id, jnp.int32),
              probs=jnp.ones((b, max_new_tokens), jnp.float32),
              done=jnp.zeros((b,), bool), lengths=jnp.full((b,), max_new_tokens, jnp.int32),
              state=jnp.full((b,), grammar_start, jnp.int32))

  def cond(c):
    return (c["i"] < max_new_tokens) & ~jnp.all(c["done"])

  def body(c):
    token, prob, state = _pick(c["logits"], c["state"], transitions, bias)
    token = jnp.where(c["done"], eos_id, token)
    prob = jnp.where(c["done"], 1.0, prob)
    state = jnp.where(c["done"], c["state"], state)
    ended = ~c["done"] & (token == eos_id)
    lengths = jnp.where(ended, c["i"] + 1, c["lengths"])
    tokens = c["tokens"].at[:, c["i"]].set(token)
    probs = c["probs"].at[:, c["i"]].set(prob)
    next_logits, cache = step_fn(token, c["cache"])
    return dict(i=c["i"] + 1, logits=next_logits, cache=cache, tokens=tokens, probs=probs,
                done=c["done"] | ended, lengths=lengths, state=state)

  out = jax.lax.while_loop(cond, body, init)
  return out["tokens"], out["probs"], out["lengths"]


def _last_logits(logits: Array, lengths: Array) -> Array:
  """f32[B, T, V] at position lengths - 1 of each row -> f32[B, V]."""
  return jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]


# ---------------------------------------------------------------------------
# Decoders.


class _Programs:
  """The jitted decoding programs of one (model, M, EOS, grammar start, suppressed ids,
  cache dtype). Cached in ``_PROGRAMS`` so that every Decoder of the same model reuses
  the compilations (params, prompts and the grammar table are arguments)."""

  def __init__(self, model, max_new_tokens, eos_id, start, suppress_ids, cache_dtype):
    self.model, self.max_new_tokens, self.eos_id = model, max_new_tokens, eos_id
    self.start, self.cache_dtype = start, cache_dtype
    self.bias = suppress_bias(suppress_ids, int(model.config.llm.vocab_size))
    self.shared = jax.jit(self._shared)
    self.rows = jax.jit(self._rows)

  def _loop(self, params, logits, cache, transitions):
    step = functools.partial(_decode_step, self.model, params)
    return greedy_loop(step, logits, cache, max_new_tokens=self.max_new_tokens,
                       eos_id=self.eos_id, transitions=transitions, grammar_start=self.start,
                       bias=self.bias)

  def _shared(self, params, images, prefix, queries, lengths, transitions):
    """The fast path. The cache lives inside this one program (prefill and loop), so
    XLA updates it in place; it never crosses a jit boundary that would need donation."""
    p, q, tq = images.shape[0], queries.shape[0], queries.shape[1]
    tp = prefix.shape[0]
    embeds = _embed_image(self.model, params, images)
    cache = _init_cache(self.model, p, tp + tq + self.max_new_tokens, self.cache_dtype)
    _, cache = _extend(self.model, params, jnp.broadcast_to(prefix, (p, tp)),
                       jnp.ones((p, tp), bool), cache, image_embeds=embeds)
    cache = jax.tree.map(lambda x: _repeat_rows(x, q, axis=0 if x.ndim == 1 else 1), cache)
    rows = jnp.tile(queries, (p, 1))
    row_lengths = jnp.tile(lengths, (p,))
    mask = jnp.arange(tq)[None] < row_lengths[:, None]
    logits, cache = _extend(self.model, params, rows, mask, cache)
    tokens, probs, out_len = self._loop(params, _last_logits(logits, row_lengths), cache,
                                        transitions)
    shape = (p, q, self.max_new_tokens)
    return tokens.reshape(shape), probs.reshape(shape), out_len.reshape(p, q)

  def _rows(self, params, images, rows, lengths, transitions):
    """The slow path (LocLLM's): one full row per (person, keypoint), image per row."""
    b, t = rows.shape
    embeds = _embed_image(self.model, params, images)
    cache = _init_cache(self.model, b, t + self.max_new_tokens, self.cache_dtype)
    mask = jnp.arange(t)[None] < lengths[:, None]
    logits, cache = _extend(self.model, params, rows, mask, cache, image_embeds=embeds)
    return self._loop(params, _last_logits(logits, lengths), cache, transitions)


_PROGRAMS: dict[tuple, _Programs] = {}


def _programs(model, *key) -> _Programs:
  """The programs for ``model`` (keyed by its config: equal configs, equal modules)."""
  import json
  full = (json.dumps(model.config.to_dict(), sort_keys=True, default=str),) + key
  if full not in _PROGRAMS:
    _PROGRAMS[full] = _Programs(model, *key)
  return _PROGRAMS[full]


class Decoder:
  """Greedy keypoint-answer decoder for one model, its params and one query set.

  Args:
    model: a ``kptjax.models.vlm.VLM`` (Linen module, unbound).
    params: its params.
    prompts: the query set (``build_prompts``).
    eos_id: end-of-sequence id.
    max_new_tokens: M (static).
    grammar: optional ``parsing.CoordinateGrammar`` for constrained decoding.
    suppress_ids: tokens never generated (default: the image placeholder, whose
      embedding the cached path would not fill; transformers: ``suppress_tokens``).
    cache_dtype: KV cache dtype (the model's compute dtype).
  """

  def __init__(self, model: Any, params: Any, prompts: Prompts, *, eos_id: int,
               max_new_tokens: int, grammar: Optional[parsing.CoordinateGrammar] = None,
               suppress_ids: Optional[Sequence[int]] = None, cache_dtype: Any = jnp.float32):
    if grammar is not None and max_new_tokens < grammar.max_tokens:
      raise errors.ConfigError(
          f"constrained decoding of '{grammar.shape}' needs decode.max_new_tokens >= "
          f"{grammar.max_tokens}, got {max_new_tokens}")
    self.model, self.params, self.prompts = model, params, prompts
    self.eos_id, self.max_new_tokens = int(eos_id), int(max_new_tokens)
    self.grammar = grammar
    self._transitions = None if grammar is None else jnp.asarray(grammar.transitions)
    if suppress_ids is None:
      suppress_ids = [int(model.config.image_token_id)]
    self.suppress_ids = tuple(int(i) for i in suppress_ids)
    self._programs = _programs(model, self.max_new_tokens, self.eos_id,
                               0 if grammar is None else grammar.start, self.suppress_ids,
                               str(jnp.dtype(cache_dtype)))

  def shared(self, images: np.ndarray):
    """Decodes every query for every person, sharing the image prefix.

    Args:
      images: f32[P, H, W, 3] normalized crops.
    Returns:
      (tokens int32[P, Q, M], probs f32[P, Q, M], lengths int32[P, Q]) as numpy.
    """
    pr = self.prompts
    out = self._programs.shared(self.params, jnp.asarray(images), jnp.asarray(pr.prefix),
                                jnp.asarray(pr.queries), jnp.asarray(pr.lengths),
                                self._transitions)
    return tuple(np.asarray(x) for x in out)

  def rows(self, images: np.ndarray):
    """LocLLM's way: P*Q independent rows, each crop encoded Q times.

    Returns the same arrays as :meth:`shared`.
    """
    p, q = images.shape[0], self.prompts.num_queries
    full, lengths = self.prompts.full_rows()
    rows = np.tile(full, (p, 1))
    row_images = np.repeat(np.asarray(images), q, axis=0)
    out = self._programs.rows(self.params, jnp.asarray(row_images), jnp.asarray(rows),
                              jnp.asarray(np.tile(lengths, p)), self._transitions)
    tokens, probs, out_len = (np.asarray(x) for x in out)
    m = self.max_new_tokens
    return tokens.reshape(p, q, m), probs.reshape(p, q, m), out_len.reshape(p, q)

  def __call__(self, images: np.ndarray, share_prefix: bool = True):
    return self.shared(images) if share_prefix else self.rows(images)


def suppress_bias(ids: Sequence[int], vocab_size: int) -> Optional[Array]:
  """f32[V]: -inf at ``ids``, 0 elsewhere (None when there is nothing to suppress)."""
  if not ids:
    return None
  return jnp.zeros((vocab_size,), jnp.float32).at[jnp.asarray(list(ids))].set(-jnp.inf)


def _repeat_rows(x: Array, times: int, axis: int) -> Array:
  """Each row of ``axis`` repeated ``times`` times in place (person-major order)."""
  return jnp.repeat(x, times, axis=axis)


def reference_greedy(model: Any, params: Any, images: np.ndarray, rows: np.ndarray,
                     lengths: np.ndarray, max_new_tokens: int, eos_id: int,
                     suppress_ids: Optional[Sequence[int]] = None):
  """Greedy decoding by full forwards, no cache: for every new token the whole
  sequence (image included) goes through ``model.__call__`` again.

  Args:
    images: f32[B, H, W, 3]; rows: int32[B, T] right-padded; lengths: int32[B].
    suppress_ids: never generated (default: the image placeholder), as ``Decoder``.
  Returns:
    tokens int32[B, M] (EOS after the end), probs f32[B, M].
  """
  b, t = rows.shape
  buf = np.full((b, t + max_new_tokens), eos_id, np.int32)
  buf[:, :t] = rows
  lengths = np.asarray(lengths, np.int32).copy()
  done = np.zeros(b, bool)
  tokens = np.full((b, max_new_tokens), eos_id, np.int32)
  probs = np.ones((b, max_new_tokens), np.float32)
  if suppress_ids is None:
    suppress_ids = [int(model.config.image_token_id)]
  bias = suppress_bias(suppress_ids, int(model.config.llm.vocab_size))

  @jax.jit
  def forward(params, images, seq, lengths):
    mask = jnp.arange(seq.shape[1])[None] < lengths[:, None]
    logits = model.apply({"params": params}, images, seq, mask)
    last = _last_logits(logits, lengths).astype(jnp.float32)
    if bias is not None:
      last = last + bias
    return jnp.argmax(last, -1), jnp.max(jax.nn.softmax(last.astype(jnp.float32), -1), -1)

  for i in range(max_new_tokens):
    tok, prob = (np.asarray(x) for x in forward(params, images, buf, lengths))
    tok = np.where(done, eos_id, tok)
    tokens[:, i] = tok
    probs[:, i] = np.where(done, 1.0, prob)
    buf[np.arange(b), lengths] = tok
    lengths = lengths + (~done)
    done |= tok == eos_id
    if done.all():
      break
  return tokens, probs


# ---------------------------------------------------------------------------
# Questions in, keypoints out.


def stop_token_id(tokenizer: Any, data_config: Any) -> int:
  """The token that ends an answer in training: ``</s>``, or for the 'chat' template the
  special token closing the assistant turn (e.g. Llama-3's ``<|eot_id|>``)."""
  from kptjax.data import conversation
  if data_config.template == "chat":
    enc = conversation.ConversationEncoder(tokenizer, data_config, 0)
    _, segments, _ = enc._chat([("q", "a")])  # pylint: disable=protected-access
    if segments and segments[0][2]:
      return int(segments[0][2][-1])
  if tokenizer.eos_token_id is None:
    raise errors.ConfigError("the tokenizer has no end-of-sequence token")
  return int(tokenizer.eos_token_id)


class Localizer:
  """Asks one set of keypoint questions about person crops and parses the answers.

  Args:
    config: the full config (model, data template and coord_format, decode options).
    model, params: the VLM and its params.
    tokenizer: the checkpoint's tokenizer.
    names, descriptions: the keypoints to ask for (descriptions may be None).
    subject: the instance word of the questions ('person', 'animal', ...).
    constrained, share_prefix, max_new_tokens: override ``config.decode``.

  ``localizer(crops, affine_inv)`` -> ``parsing.Localization`` with P x Q keypoints in
  original-image pixels; an answer that does not parse is ``missing`` (value 0, never the
  crop centre).
  """

  def __init__(self, config: Any, model: Any, params: Any, tokenizer: Any,
               names: Sequence[str], descriptions: Sequence[Optional[str]], *,
               subject: str = "person", constrained: Optional[bool] = None,
               share_prefix: Optional[bool] = None, max_new_tokens: Optional[int] = None):
    dec = config.decode
    self.constrained = dec.constrained if constrained is None else bool(constrained)
    self.share_prefix = dec.share_prefix if share_prefix is None else bool(share_prefix)
    self.max_new_tokens = int(max_new_tokens or dec.max_new_tokens)
    self.names = list(names)
    self.crop_size = int(config.model.vit.image_size)
    fmt = config.data.coord_format
    self.count = parsing.num_values(fmt)
    self.eos_id = stop_token_id(tokenizer, config.data)
    vocab = int(config.model.llm.vocab_size)
    if fmt == "loc_tokens":
      bins_by_id = parsing.loc_token_bins(tokenizer)
      loc_bins = int(config.data.get("loc_bins", 100))
      self.scorer = functools.partial(parsing.score_loc_answer, bins_by_id=bins_by_id,
                                      eos_id=self.eos_id, loc_bins=loc_bins)
      grammar = parsing.build_loc_grammar(sorted(bins_by_id), vocab, self.eos_id)
    else:
      self.token_strs = parsing.token_strings(tokenizer, vocab)
      self.scorer = functools.partial(parsing.score_answer, token_strs=self.token_strs,
                                      eos_id=self.eos_id, count=self.count)
      grammar = None
      if self.constrained:
        from kptjax.data import conversation
        probe = conversation.format_answer(np.full(self.count, 0.5), config.data)
        grammar = parsing.build_grammar(self.token_strs, parsing.shape_from_example(probe),
                                        self.eos_id)
    self.prompts = build_prompts(tokenizer, config, names, descriptions, subject=subject,
                                 pad_id=self.eos_id)
    self.decoder = Decoder(model, params, self.prompts, eos_id=self.eos_id,
                           max_new_tokens=self.max_new_tokens,
                           grammar=grammar if self.constrained else None,
                           cache_dtype=config.model.dtype)

  def decode(self, crops: np.ndarray):
    """(tokens int32[P, Q, M], probs f32[P, Q, M], lengths int32[P, Q])."""
    return self.decoder(crops, share_prefix=self.share_prefix)

  def __call__(self, crops: np.ndarray, affine_inv: np.ndarray) -> parsing.Localization:
    """crops f32[P, H, W, 3] normalized; affine_inv f32[P, 2, 3] crop px -> image px."""
    tokens, probs, _ = self.decode(crops)
    return parsing.localize(tokens, probs, self.scorer, self.count, np.asarray(affine_inv),
                            self.crop_size)
