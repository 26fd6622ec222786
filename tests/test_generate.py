"""The decode engine's work: the last block only where a prompt is read, and cached
attention whose [.., T, S] scores are never transposed.

The tiny VLM of tests/conftest.py (random weights) prefills a prefix shared by P persons
and Q right-padded query rows per person, as ``kptjax.inference.generate`` does.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kptjax.inference import generate
from kptjax.models import llama, vlm

P, Q, TP, TQ, MAX_NEW = 2, 3, 5, 7, 4


@pytest.fixture(scope="module")
def inputs(model_params):
  model, params = model_params
  c = model.config
  rng = np.random.default_rng(0)
  n = vlm.num_image_tokens(c)
  prefix = np.concatenate([[1], np.full(n, c.image_token_id), rng.integers(5, 100, TP - 1)])
  rows = rng.integers(5, c.llm.vocab_size, (P * Q, TQ)).astype(np.int32)
  lengths = np.array([TQ, 3, 5, 1, TQ, 6] * (P * Q // 6), np.int32)
  images = rng.normal(size=(P, c.vit.image_size, c.vit.image_size, 3)).astype(np.float32)
  return model, params, prefix.astype(np.int32), rows, lengths, images


def _prefilled(model, params, prefix, images):
  """The prefix prefilled once per person, shared by Q rows (``llama.with_prefix``)."""
  apply = lambda method, *a, **k: model.apply({"params": params}, *a, method=method, **k)
  tp = len(prefix)
  cache = vlm.init_cache(model.config, P, tp)
  _, cache = apply("extend_hidden", np.tile(prefix, (P, 1)), np.ones((P, tp), bool), cache,
                   image_embeds=apply("embed_image", images))
  return llama.with_prefix(cache, Q, TQ + MAX_NEW)


@pytest.mark.parametrize("shared", [True, False])
def test_last_block_at_the_read_position_equals_the_full_extend(inputs, shared):
  """``extend_hidden(read=lengths - 1)`` gives each row's hidden at its last prompt
  token as the full extend does, and writes the very same cache (keys and values of
  every position, of every layer, and the same ends)."""
  model, params, prefix, rows, lengths, images = inputs
  mask = np.arange(TQ)[None] < lengths[:, None]

  @jax.jit
  def both(params, images):
    if shared:
      cache = _prefilled(model, params, prefix, images)
    else:
      cache = vlm.init_cache(model.config, P * Q, TQ + MAX_NEW)
    apply = lambda *a, **k: model.apply({"params": params}, *a, method="extend_hidden", **k)
    full, full_cache = apply(rows, mask, cache)
    read, read_cache = apply(rows, mask, cache, read=jnp.asarray(lengths - 1))
    return full, full_cache, read, read_cache

  full, full_cache, read, read_cache = both(params, images)
  assert read.shape == (P * Q, 1, full.shape[-1])
  np.testing.assert_allclose(read[:, 0], full[np.arange(P * Q), lengths - 1],
                             rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(read_cache), jax.tree.leaves(full_cache)):
    np.testing.assert_array_equal(a, b)


def _eqns(jaxpr):
  """Every equation of a jaxpr, its sub-jaxprs (jit, while, cond) included."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (tuple, list)) else (param,)):
        if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
          yield from _eqns(sub)


def _engine_jaxpr(inputs):
  model, params, prefix, rows, lengths, images = inputs
  run = generate.program(model, max_new_tokens=MAX_NEW, eos_id=2)
  return jax.make_jaxpr(run)(params, images, rows, lengths, prefix, None, None)


def test_query_prefill_runs_the_last_block_only_where_read(inputs):
  """In the engine's program the MLP (gate and up projections, [rows, T, F]) runs over
  every query token in all blocks but the last, whose MLP sees one token per row."""
  model = inputs[0]
  c = model.config.llm
  mlp_dots = [tuple(e.outvars[0].aval.shape) for e in _eqns(_engine_jaxpr(inputs))
              if e.primitive.name == "dot_general"
              and e.outvars[0].aval.shape[-1] == c.intermediate_size
              and e.outvars[0].aval.shape[0] == P * Q]
  over_queries = [s for s in mlp_dots if s[:2] == (P * Q, TQ)]
  at_read = [s for s in mlp_dots if s[:2] == (P * Q, 1)]
  assert len(over_queries) == 2 * (c.num_layers - 1), mlp_dots
  # the read position's last block, then each step's blocks (gate and up per block)
  assert len(at_read) == 2 + 2 * c.num_layers, mlp_dots


def test_cached_attention_never_transposes_the_scores(inputs):
  """No transpose in the engine's program moves a tensor that spans both the query
  tokens and the cached positions (the [.., T, S] scores and probabilities)."""
  model, _, prefix, *_ = inputs
  tp, s = len(prefix), TQ + MAX_NEW
  moved = [tuple(e.invars[0].aval.shape) for e in _eqns(_engine_jaxpr(inputs))
           if e.primitive.name == "transpose"]
  scores = [shape for shape in moved if TQ in shape and (tp in shape or s in shape)]
  assert moved and not scores, scores


def test_length_groups_pad_the_fewest_tokens():
  """Contiguous groups of the sorted lengths, each at its longest; an extra group only
  when it saves min_saving of the padded total; ascending lengths required."""
  lengths = [42, 42, 43, 43, 44, 44, 44, 44, 47, 48, 48, 51, 51, 51, 51, 51, 53]
  assert generate.length_groups(lengths, 1) == ((0, 17, 53),)
  assert generate.length_groups(lengths) == ((0, 8, 44), (8, 17, 53))        # 829 of 901
  assert generate.length_groups(lengths, 3, min_saving=0.0) == (
      (0, 8, 44), (8, 16, 51), (16, 17, 53))                                  # 813 tokens
  assert generate.length_groups([7]) == ((0, 1, 7),)
  assert generate.length_groups([50, 50, 50, 51]) == ((0, 4, 51),)   # 3 of 204: not worth it
  with pytest.raises(ValueError, match="ascending"):
    generate.length_groups([9, 5])
