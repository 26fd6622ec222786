"""Greedy decoding of keypoint answers: prompts, the decoders and the localizer.

The fast path (``Decoder.shared``), per batch of P persons and Q keypoint queries, one
jitted program of the engine (``kptjax.inference.generate``):

  1. each crop is encoded once: ``embed_image`` -> f32[P, N, D];
  2. the shared prefix (``<s>`` + image header with N image slots) is prefilled once
     per person into a cache of P rows, without vocabulary logits;
  3. ``llama.with_prefix`` keeps that cache once per person and gives each of the P*Q
     rows an empty suffix; the Q query suffixes (right-padded) are prefilled in one
     ``extend_hidden`` and the logits are read only at each row's last token;
  4. a ``lax.while_loop`` of one-token steps runs until every row has ended or
     ``max_new_tokens`` were written (static).

Attention merges the per-person prefix and the per-row suffix exactly
(``llama.cached_attention``); no [P*Q, prefix, ...] tensor exists. Persons are padded
to a power of two (``generate.bucket``) so a sweep compiles a handful of programs, and
may be split over a mesh's data axes with the weights sharded as in training
(``Decoder(mesh=...)``).

The slow path (``Decoder.rows``) is LocLLM's: one full sequence per (person, keypoint)
row, the image encoded for every row. ``reference_greedy`` recomputes the full forward
for every new token (no cache) and is the ground truth of the tests.

Greedy picks ``argmax(logits)``; with a ``CoordinateGrammar`` (constrained decoding)
the argmax runs over the tokens the grammar allows in each row's state, so every
answer parses. Along with each token the loop records its probability under the
unconstrained softmax (= the max probability for plain greedy), which
``kptjax.inference.parsing.score_answer`` turns into the LocLLM confidence.
The image placeholder id is never generated (its embedding is only filled in prompts).

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

from kptjax import errors, sharding
from kptjax.inference import parsing
from kptjax.inference.generate import bucket, pad_rows, program, suppress_bias
from kptjax.models import vlm

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
# Decoders.


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
    mesh, rules: optional device mesh and logical-axis rules (``config.mesh``): the
      params are placed as in training (``sharding.logical_shardings``) and the persons
      split over the mesh's data axes. Params assigned later must be placed alike.
  """

  def __init__(self, model: Any, params: Any, prompts: Prompts, *, eos_id: int,
               max_new_tokens: int, grammar: Optional[parsing.CoordinateGrammar] = None,
               suppress_ids: Optional[Sequence[int]] = None, cache_dtype: Any = jnp.float32,
               mesh: Any = None, rules: Any = None):
    if grammar is not None and max_new_tokens < grammar.max_tokens:
      raise errors.ConfigError(
          f"constrained decoding of '{grammar.shape}' needs decode.max_new_tokens >= "
          f"{grammar.max_tokens}, got {max_new_tokens}")
    self.model, self.prompts, self.mesh = model, prompts, mesh
    self.eos_id, self.max_new_tokens = int(eos_id), int(max_new_tokens)
    self.grammar = grammar
    self._transitions = None if grammar is None else jnp.asarray(grammar.transitions)
    if suppress_ids is None:
      suppress_ids = [int(model.config.image_token_id)]
    self.suppress_ids = tuple(int(i) for i in suppress_ids)
    self._program = program(model, max_new_tokens=self.max_new_tokens, eos_id=self.eos_id,
                            grammar_start=0 if grammar is None else grammar.start,
                            suppress_ids=self.suppress_ids, cache_dtype=cache_dtype,
                            mesh=mesh)
    self._multiple = 1
    if mesh is not None:
      shardings = sharding.logical_shardings(vlm.abstract_params(model.config), mesh,
                                             rules if rules is not None else ())
      params = jax.device_put(params, shardings)
      self._multiple = sharding.data_parallel_size(mesh)
    self.params = params

  def _images(self, images: np.ndarray) -> Array:
    if self.mesh is None:
      return jnp.asarray(images)
    return jax.device_put(np.asarray(images), sharding.batch_sharding(self.mesh))

  def shared(self, images: np.ndarray):
    """Decodes every query for every person, sharing the image prefix.

    Args:
      images: f32[P, H, W, 3] normalized crops (padded to ``bucket(P)`` inside).
    Returns:
      (tokens int32[P, Q, M], probs f32[P, Q, M], lengths int32[P, Q]) as numpy.
    """
    pr, p, q = self.prompts, len(images), self.prompts.num_queries
    size = bucket(p, self._multiple)
    out = self._program(self.params, self._images(pad_rows(images, size)),
                        jnp.asarray(np.tile(pr.queries, (size, 1))),
                        jnp.asarray(np.tile(pr.lengths, size)), jnp.asarray(pr.prefix), None,
                        self._transitions)
    return self._per_person(out, p, q)

  def rows(self, images: np.ndarray):
    """LocLLM's way: P*Q independent rows, each crop encoded Q times.

    Returns the same arrays as :meth:`shared`.
    """
    p, q = len(images), self.prompts.num_queries
    size = bucket(p, self._multiple)
    full, lengths = self.prompts.full_rows()
    out = self._program(self.params, self._images(np.repeat(pad_rows(images, size), q, 0)),
                        jnp.asarray(np.tile(full, (size, 1))),
                        jnp.asarray(np.tile(lengths, size)), None, None, self._transitions)
    return self._per_person(out, p, q)

  def _per_person(self, out, p: int, q: int):
    tokens, probs, lengths, _ = (np.asarray(x) for x in out)
    m = self.max_new_tokens
    return (tokens.reshape(-1, q, m)[:p], probs.reshape(-1, q, m)[:p],
            lengths.reshape(-1, q)[:p])

  def __call__(self, images: np.ndarray, share_prefix: bool = True):
    return self.shared(images) if share_prefix else self.rows(images)


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
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    last = last.astype(jnp.float32)
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
