"""The decode engine: one jitted program per (model, options, batch shape) that encodes
the crops, prefills the prompts (optionally a prefix shared per person) and runs a
greedy ``lax.while_loop`` of one-token steps. Every task plugs in here: LocLLM-style
text answers and constrained coordinates (``kptjax.inference.decode``), KptLLM's ``<keypoint>``
regression and CapeLLM / semantic text answers (``kptjax.inference.kpt_decode``).

    >>> run = program(model, max_new_tokens=13, eos_id=2)
    >>> tokens, probs, lengths, aux = run(params, images, rows, lengths, prefix, None, None)

Only the needed work: vocabulary logits are computed only where they are read (the
last prompt token, then each step's token), and so is the last block's query side
(``extend_hidden(read=...)``: over the other prompt tokens it computes only the keys and
values that later tokens attend to); the cache lives inside the program and
each layer's buffer is written in place by the loop (``llama.cached_attention``); the
loop stops when every row has ended; weights are unstacked per layer once, before the
loop (``decoding_model``).

Shapes: P persons, Q rows per person, B rows, T tokens, M = max_new_tokens, V vocabulary.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kptjax import sharding
from kptjax.models import llama, vlm

Array = jax.Array


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
  return token.astype(jnp.int32), logp, state


def greedy_loop(step_fn, logits: Array, aux: Any, cache: Any, *, max_new_tokens: int,
                eos_id: int, answer_id: Optional[int] = None,
                transitions: Optional[Array] = None, grammar_start: int = 0,
                bias: Optional[Array] = None):
  """Greedy decoding from the next-token ``logits`` f32[B, V] of a prefilled cache.

  Args:
    step_fn: (token i32[B], cache) -> (logits f32[B, V], aux, cache): feeds one token per
      row; ``aux`` is a pytree of [B, ...] arrays read at the fed token (``VLM.read``).
    aux: a pytree shaped like step_fn's aux (its values are not used).
    max_new_tokens: M, static.
    answer_id: None: a row ends when it emits ``eos_id`` (and its EOS is not fed). Else
      (KptLLM's ``<keypoint>``): a row ends once ``answer_id`` has been fed, and
      ``answer_id`` is forced right after an EOS and at the last step, so every row
      gets one; the aux read at that feed is returned.
    transitions: optional int32[S, V] grammar (``parsing.CoordinateGrammar``).
    bias: optional f32[V] added to the logits (-inf suppresses a token everywhere).
  Returns:
    tokens int32[B, M] (EOS after the end), probs f32[B, M] (1 after the end),
    lengths int32[B] tokens up to and including the ending token (M if none), and the
    aux read at each row's ``answer_id`` (``aux`` zeros without answer_id).
  """
  m, b = max_new_tokens, logits.shape[0]
  ending = eos_id if answer_id is None else answer_id
  columns = m + (answer_id is not None)          # the last pick after the final feed

  def pick(i, logits, c):
    token, logp, state = _pick(logits, c["state"], transitions, bias)
    if answer_id is not None:
      token = jnp.where(c["eos"] | (i == m - 1), answer_id, token)
    token = jnp.where(c["done"], eos_id, token)
    prob = jnp.where(c["done"], 1.0,
                     jnp.exp(jnp.take_along_axis(logp, token[:, None], axis=1)[:, 0]))
    fresh = ~c["done"] & (token == ending)
    return dict(c, i=i + 1, token=token, state=jnp.where(c["done"], c["state"], state),
                tokens=c["tokens"].at[:, i].set(token), probs=c["probs"].at[:, i].set(prob),
                lengths=jnp.where(fresh & (c["lengths"] == m), i + 1, c["lengths"]),
                eos=c["eos"] | (token == eos_id),
                done=c["done"] | (fresh if answer_id is None else jnp.zeros_like(fresh)))

  init = dict(cache=cache, token=jnp.zeros((b,), jnp.int32),
              tokens=jnp.full((b, columns), eos_id, jnp.int32),
              probs=jnp.ones((b, columns), jnp.float32),
              lengths=jnp.full((b,), m, jnp.int32), eos=jnp.zeros((b,), bool),
              done=jnp.zeros((b,), bool), state=jnp.full((b,), grammar_start, jnp.int32),
              answer=jax.tree.map(jnp.zeros_like, aux))
  first = pick(jnp.int32(0), logits, init)

  def cond(c):
    return (c["i"] < columns) & ~jnp.all(c["done"])

  def body(c):
    logits, aux, cache = step_fn(c["token"], c["cache"])
    c = dict(c, cache=cache)
    if answer_id is not None:
      got = ~c["done"] & (c["token"] == answer_id)
      c["answer"] = jax.tree.map(
          lambda new, old: jnp.where(got.reshape((-1,) + (1,) * (new.ndim - 1)), new, old),
          aux, c["answer"])
      c["done"] = c["done"] | got
    return pick(c["i"], logits, c)

  out = jax.lax.while_loop(cond, body, first)
  return out["tokens"][:, :m], out["probs"][:, :m], out["lengths"], out["answer"]


# ---------------------------------------------------------------------------
# The engine.


def decoding_model(model: Any, params: Any) -> tuple[Any, Any]:
  """(model, params) with the decoder layers unstacked (``scan_layers=False``, params
  ``layers_0 .. layers_{L-1}``) and no remat: each layer's weights are then separate
  buffers that the decode loop reads without slicing. Works under jit."""
  config = model.config
  if not config.scan_layers:
    return model, params
  config = ml_collections.ConfigDict(config.to_dict())
  config.scan_layers, config.remat_policy = False, "none"
  stacked = params["llm"]["layers"]
  llm = {k: v for k, v in params["llm"].items() if k != "layers"}
  for i in range(int(config.llm.num_layers)):
    llm[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
  return type(model)(config), {**params, "llm": llm}


Groups = tuple[tuple[int, int, int], ...]   # (first query, end query, length) of each group


def length_groups(lengths: Sequence[int], max_groups: int = 3,
                  min_saving: float = 0.04) -> Groups:
  """How to prefill Q query rows in length groups instead of all padded to the longest.

  ``lengths`` must be sorted (ascending). Returns contiguous groups ((a, z, T_g), ...)
  covering 0..Q, each prefilled at its own length T_g = lengths[z-1]: the split with at
  most ``max_groups`` groups that pads the fewest tokens, where each extra group must
  save at least ``min_saving`` of the Q x max(lengths) tokens (it costs a copy of its
  rows' caches and a separate, smaller prefill).
  """
  lengths = [int(x) for x in lengths]
  if any(a > b for a, b in zip(lengths, lengths[1:])):
    raise ValueError(f"length_groups needs ascending lengths, got {lengths}")
  q = len(lengths)
  cost = lambda a, z: (z - a) * lengths[z - 1]                      # tokens of group a..z
  # table[g][z]: (fewest tokens, spans) of the first z queries in g groups.
  table = [None, {z: (cost(0, z), ((0, z),)) for z in range(1, q + 1)}]
  for g in range(2, min(max_groups, q) + 1):
    table.append({z: min(((table[g - 1][a][0] + cost(a, z), table[g - 1][a][1] + ((a, z),))
                          for a in range(g - 1, z)), key=lambda x: x[0])
                  for z in range(g, q + 1)})
  best = table[1][q]
  for tokens, spans in (t[q] for t in table[2:]):
    if best[0] - tokens >= min_saving * q * lengths[-1]:
      best = (tokens, spans)
  return tuple((a, z, lengths[z - 1]) for a, z in best[1])


def _take_queries(x: Array, p: int, a: int, z: int) -> Array:
  """Rows a..z of every person of person-major x [P*Q, ...] -> [P*(z-a), ...]."""
  return x.reshape(p, -1, *x.shape[1:])[:, a:z].reshape(-1, *x.shape[1:])


def _join_queries(parts: Sequence[Array], p: int) -> Array:
  """Inverse of ``_take_queries`` over consecutive groups: [P*Q_g, ...] each -> [P*Q, ...]."""
  if len(parts) == 1:
    return parts[0]
  joined = jnp.concatenate([x.reshape(p, -1, *x.shape[1:]) for x in parts], axis=1)
  return joined.reshape(-1, *joined.shape[2:])


def generate(model: Any, params: Any, images: Array, rows: Array, lengths: Array, *,
             prefix: Optional[Array] = None, prompt_embeds: Optional[Array] = None,
             max_new_tokens: int, eos_id: int, answer_id: Optional[int] = None,
             transitions: Optional[Array] = None, grammar_start: int = 0,
             bias: Optional[Array] = None, cache_dtype: Any = jnp.float32,
             constrain: Any = None, groups: Optional[Groups] = None):
  """Greedy answers of B rows (traced: call it inside ``jax.jit``).

  Args:
    model, params: a ``VLM`` (or ``KptLLM``) and its params.
    images: f32[P, H, W, 3] one crop per person with ``prefix``, else f32[B, H, W, 3]
      one per row.
    rows: i32[B, T] right-padded; with ``prefix`` the suffixes of B = P * Q rows,
      person-major, else whole rows holding the image placeholders.
    lengths: i32[B] real length of each row.
    prefix: i32[Tp] shared by every person (its image slots take the person's crop),
      prefilled once per person and stored once (``llama.with_prefix``).
    prompt_embeds: f32[B, R, D] KptLLM prompt slots of the rows.
    answer_id, transitions, grammar_start, bias: see ``greedy_loop``.
    constrain: optional function applied to every cache (e.g. a sharding constraint
      of the leading, batch dimension).
    groups: with ``prefix``, optional static ``length_groups`` of the Q = B / P query
      rows (the same for every person): each group is prefilled at its own length, not
      padded to T, and the groups' caches are joined before the loop.
  Returns:
    ``greedy_loop``'s (tokens i32[B, M], probs f32[B, M], lengths i32[B], answer aux).
  """
  constrain = constrain or (lambda tree: tree)
  model, params = decoding_model(model, params)

  def apply(method, *args, **kwargs):
    return model.apply({"params": params}, *args, method=method, **kwargs)

  b, t = rows.shape
  image_embeds = apply("embed_image", images)
  if prefix is None:
    cache = constrain(vlm.init_cache(model.config, b, t + max_new_tokens, cache_dtype))
    mask = jnp.arange(t)[None] < lengths[:, None]
    hidden, cache = apply("extend_hidden", rows, mask, cache, image_embeds=image_embeds,
                          prompt_embeds=prompt_embeds, read=lengths - 1)
  else:
    p, tp = images.shape[0], prefix.shape[0]
    prefix_cache = constrain(vlm.init_cache(model.config, p, tp, cache_dtype))
    _, prefix_cache = apply("extend_hidden", jnp.broadcast_to(prefix, (p, tp)),
                            jnp.ones((p, tp), bool), prefix_cache, image_embeds=image_embeds)
    hiddens, caches = [], []
    for a, z, tg in groups or ((0, b // p, t),):
      def part(x, a=a, z=z):
        return None if x is None else _take_queries(x, p, a, z)
      sub_lengths = part(lengths)
      cache = constrain(llama.with_prefix(prefix_cache, z - a, t + max_new_tokens))
      mask = jnp.arange(tg)[None] < sub_lengths[:, None]
      hidden, cache = apply("extend_hidden", part(rows)[:, :tg], mask, cache,
                            prompt_embeds=part(prompt_embeds), read=sub_lengths - 1)
      hiddens.append(hidden)
      caches.append(cache)
    hidden = _join_queries(hiddens, p)
    cache = dict(caches[0], **{k: jax.tree.map(lambda *xs: _join_queries(xs, p),
                                               *[c[k] for c in caches])
                               for k in ("k", "v", "end")})
  cache = constrain(cache)
  logits, aux = apply("read", hidden[:, 0])

  def step(token, cache):
    hidden, cache = apply("extend_hidden", token[:, None], jnp.ones((b, 1), bool), cache)
    logits, aux = apply("read", hidden[:, 0])
    return logits, aux, constrain(cache)

  return greedy_loop(step, logits, aux, cache, max_new_tokens=max_new_tokens, eos_id=eos_id,
                     answer_id=answer_id, transitions=transitions,
                     grammar_start=grammar_start, bias=bias)


_PROGRAMS: dict[tuple, Any] = {}


def program(model: Any, *, max_new_tokens: int, eos_id: int, answer_id: Optional[int] = None,
            grammar_start: int = 0, suppress_ids: Sequence[int] = (),
            cache_dtype: Any = jnp.float32, mesh: Any = None):
  """``generate`` jitted for one model and these static options:
  fn(params, images, rows, lengths, prefix, prompt_embeds, transitions, groups=None)
  -> its outputs (``groups`` static: a hashable ``length_groups`` tuple).

  Cached by the model's config and the options, so every decoder of the same model
  reuses the compilations (one per input shape; ``bucket`` keeps them few). With a
  ``mesh`` the caches' rows are split over its data axes.
  """
  key = (json.dumps(model.config.to_dict(), sort_keys=True, default=str), type(model).__name__,
         max_new_tokens, eos_id, answer_id, grammar_start, tuple(suppress_ids),
         str(jnp.dtype(cache_dtype)), mesh)
  if key not in _PROGRAMS:
    bias = suppress_bias(suppress_ids, int(model.config.llm.vocab_size))
    constrain = None
    if mesh is not None:
      rows_sharding = sharding.batch_sharding(mesh)
      constrain = lambda tree: jax.tree.map(
          lambda x: jax.lax.with_sharding_constraint(x, rows_sharding), tree)

    def run(params, images, rows, lengths, prefix, prompt_embeds, transitions, groups=None):
      return generate(model, params, images, rows, lengths, prefix=prefix,
                      prompt_embeds=prompt_embeds, max_new_tokens=max_new_tokens,
                      eos_id=eos_id, answer_id=answer_id, transitions=transitions,
                      grammar_start=grammar_start, bias=bias, cache_dtype=cache_dtype,
                      constrain=constrain, groups=groups)

    _PROGRAMS[key] = jax.jit(run, static_argnames="groups")
  return _PROGRAMS[key]


def bucket(n: int, multiple: int = 1) -> int:
  """The batch size that n rows are padded to: the next power of two, at least
  ``multiple`` and a multiple of it (so a sweep compiles a handful of programs)."""
  size = 1 << max(0, int(n) - 1).bit_length()
  return max(multiple, -(-size // multiple) * multiple)


def pad_rows(x: np.ndarray, size: int) -> np.ndarray:
  """x [n, ...] padded to [size, ...] by repeating its first row."""
  x = np.asarray(x)
  if len(x) == size:
    return x
  return np.concatenate([x, np.repeat(x[:1], size - len(x), axis=0)])


def suppress_bias(ids: Sequence[int], vocab_size: int) -> Optional[Array]:
  """f32[V]: -inf at ``ids``, 0 elsewhere (None when there is nothing to suppress)."""
  if not ids:
    return None
  return jnp.zeros((vocab_size,), jnp.float32).at[jnp.asarray(list(ids))].set(-jnp.inf)
