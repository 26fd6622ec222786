"""Greedy decoding: cache vs full forwards, shared prefix vs per-keypoint rows, parity
with transformers' generate, constrained decoding.

One tiny model for every test: random Hugging Face DINOv2 + Llama checkpoints shaped
like configs/tiny.py, converted with ``kptjax.convert.load_vlm`` (so the torch reference
holds the very same weights), the bundled tiny tokenizer, and the LocLLM template with
COCO keypoint names and descriptions.
"""

import importlib.util
import pathlib
import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import tiny
from kptjax import convert, errors, sharding
from kptjax.data import tokenizer as tok_lib
from kptjax.inference import decode, generate, parsing
from kptjax.keypoints import get_spec
from kptjax.models import llama, vlm

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_NEW = 16
QUERIES = ("nose", "left wrist", "right ankle")


def _bench_module():
  spec = importlib.util.spec_from_file_location("bench_decode",
                                                ROOT / "experiments" / "bench_decode.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  bench = _bench_module()
  config = tiny.get_config().unlock()
  vit_dir, llm_dir = bench.make_hf_checkpoints(config.model, str(tmp_path_factory.mktemp("hf")))
  config.checkpoints.vit_dir, config.checkpoints.llm_dir = vit_dir, llm_dir
  model_config, params = convert.load_vlm(config)
  config.model = model_config
  config.lock()
  tokenizer = tok_lib.load_tokenizer("")
  spec = get_spec("coco17")
  idx = [spec.index(n) for n in QUERIES]
  names = [spec.names[i] for i in idx]
  descriptions = [spec.descriptions[i] for i in idx]
  prompts = decode.build_prompts(tokenizer, config, names, descriptions,
                                 pad_id=tokenizer.eos_token_id)
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  return dict(bench=bench, config=config, model=vlm.VLM(config.model), params=params,
              tokenizer=tokenizer, names=names, descriptions=descriptions, prompts=prompts,
              images=images, eos=tokenizer.eos_token_id, vit_dir=vit_dir, llm_dir=llm_dir)


@pytest.fixture(scope="module")
def decoder(setup):
  return decode.Decoder(setup["model"], setup["params"], setup["prompts"], eos_id=setup["eos"],
                        max_new_tokens=MAX_NEW)


@pytest.fixture(scope="module")
def slow_outputs(setup, decoder):
  return decoder.rows(setup["images"])


def test_prompts_are_the_training_segments(setup):
  """Prefix = <s> + 'Image: ' + N image slots + newline; queries end with 'Answer: '."""
  pr, tok = setup["prompts"], setup["tokenizer"]
  n = vlm.num_image_tokens(setup["config"].model)
  assert pr.prefix[0] == tok.bos_token_id
  assert (pr.prefix == setup["config"].model.image_token_id).sum() == n
  for row, length in zip(pr.queries, pr.lengths):
    text = tok.decode(row[:length])
    assert text.startswith("Keypoint: ") and text.rstrip().endswith("Answer:")


def test_cached_greedy_equals_full_forward_argmax(setup, slow_outputs):
  """The KV-cache loop picks, token for token, the argmax of a full forward pass
  recomputed over the whole sequence (image included) at every step."""
  tokens, probs, lengths = slow_outputs
  full, full_len = setup["prompts"].full_rows()
  p, q = setup["images"].shape[0], len(QUERIES)
  ref_tokens, ref_probs = decode.reference_greedy(
      setup["model"], setup["params"], np.repeat(setup["images"], q, 0), np.tile(full, (p, 1)),
      np.tile(full_len, p), MAX_NEW, setup["eos"])
  np.testing.assert_array_equal(tokens.reshape(p * q, -1), ref_tokens)
  np.testing.assert_allclose(probs.reshape(p * q, -1), ref_probs, atol=1e-5)
  assert len(np.unique(ref_tokens)) > 3           # not a degenerate constant answer


def test_shared_prefix_equals_per_keypoint_rows(setup, decoder, slow_outputs):
  """One image encoding + one prefix prefill per person gives the slow path's tokens,
  hence the same coordinates and scores."""
  fast = decoder.shared(setup["images"])
  np.testing.assert_array_equal(fast[0], slow_outputs[0])
  np.testing.assert_array_equal(fast[2], slow_outputs[2])
  np.testing.assert_allclose(fast[1], slow_outputs[1], atol=1e-5)
  strs = parsing.token_strings(setup["tokenizer"], setup["config"].model.llm.vocab_size)
  scorer = lambda t, pr: parsing.score_answer(t, pr, strs, setup["eos"], 2)
  affine = np.tile(np.array([[2, 0, 5], [0, 2, 7]], np.float32), (2, 1, 1))
  a = parsing.localize(fast[0], fast[1], scorer, 2, affine, 32)
  b = parsing.localize(slow_outputs[0], slow_outputs[1], scorer, 2, affine, 32)
  np.testing.assert_array_equal(a.keypoints, b.keypoints)
  np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)


def test_parity_with_transformers_generate(setup, decoder):
  """transformers' DINOv2 -> projector -> LlamaForCausalLM.generate(do_sample=False) on the
  same converted weights, LocLLM's batching (one left-padded row per keypoint, the crop
  encoded per row) produces the same tokens."""
  ref = setup["bench"].TorchLocLLM(setup["vit_dir"], setup["llm_dir"],
                                   setup["params"]["projector"],
                                   setup["config"].model.image_token_id)
  full, lengths = setup["prompts"].full_rows()
  rows = [list(full[i, :lengths[i]]) for i in range(len(QUERIES))]
  tokens, probs, _ = decoder.shared(setup["images"])
  for p in range(setup["images"].shape[0]):
    ref_tokens, ref_probs = ref.generate(np.repeat(setup["images"][p:p + 1], len(QUERIES), 0),
                                         rows, MAX_NEW, setup["eos"])
    np.testing.assert_array_equal(tokens[p], ref_tokens)
    np.testing.assert_allclose(probs[p], ref_probs, atol=1e-4)


ANSWER_RE = re.compile(r"^ ?\[0\.\d{3},0\.\d{3}\]$")


@pytest.fixture(scope="module")
def random_params(setup):
  return jax.jit(lambda key: vlm.init_params(setup["config"].model, key))


@pytest.mark.parametrize("seed", [0, 1])
def test_constrained_decoding_always_parses_from_random_weights(setup, random_params, seed):
  """With random weights the unconstrained answers are garbage; the grammar makes every
  answer a well-formed coordinate string."""
  params = random_params(jax.random.key(seed))
  # 4 persons: the batch of tests/test_evaluate.py, so the compilation is shared.
  images = np.random.default_rng(seed).normal(size=(4, 32, 32, 3)).astype(np.float32)
  affine = np.tile(np.array([[1, 0, 0], [0, 1, 0]], np.float32), (4, 1, 1))
  loc = _localizer(setup, params, constrained=True)
  out = loc(images, affine)
  assert out.ok.all() and out.num_failures == 0
  assert all(ANSWER_RE.match(t) for row in out.texts for t in row), out.texts
  assert ((out.values >= 0) & (out.values < 1)).all()
  assert ((out.scores > 0) & (out.scores <= 1)).all()
  free = _localizer(setup, params, constrained=False)(images, affine)
  assert free.num_failures > 0                     # what the grammar prevents


_LOCALIZERS = {}


def _localizer(setup, params, constrained):
  """One Localizer (one compilation) per mode; params swapped for each seed."""
  key = constrained
  if key not in _LOCALIZERS:
    spec = get_spec("coco17")
    _LOCALIZERS[key] = decode.Localizer(setup["config"], setup["model"], params,
                                        setup["tokenizer"], spec.names, spec.descriptions,
                                        constrained=constrained)
  loc = _LOCALIZERS[key]
  loc.decoder.params = params
  return loc


def test_constrained_budget_too_small_is_a_config_error(setup):
  with pytest.raises(errors.ConfigError, match="max_new_tokens"):
    decode.Localizer(setup["config"], setup["model"], setup["params"], setup["tokenizer"],
                     setup["names"], setup["descriptions"], constrained=True, max_new_tokens=8)


def _avals(jaxpr):
  """Every intermediate's shape in a (closed) jaxpr and the jaxprs nested in it."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      yield tuple(getattr(v.aval, "shape", ()))
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (tuple, list)) else (param,)):
        if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
          yield from _avals(sub)


def test_shared_prefix_is_stored_once_and_never_per_row(setup, decoder):
  """The cache holds the prefix once per person ([P, K, Tp, H] per layer) and only the
  suffixes per row ([P*Q, K, Tq + M, H]); no value anywhere in the decoding program
  (prefill, loop, attention) has both a P*Q rows axis and the prefix or full length."""
  model, params, pr = setup["model"], setup["params"], setup["prompts"]
  p, q, tp, tq = 2, len(QUERIES), len(pr.prefix), pr.queries.shape[1]
  rows = np.tile(pr.queries, (p, 1))
  mask = np.arange(tq)[None] < np.tile(pr.lengths, p)[:, None]

  def caches(params, images):
    apply = lambda method, *a, **k: model.apply({"params": params}, *a, method=method, **k)
    cache = vlm.init_cache(model.config, p, tp)
    _, cache = apply("extend_hidden", np.tile(pr.prefix, (p, 1)), np.ones((p, tp), bool),
                     cache, image_embeds=apply("embed_image", images))
    cache = llama.with_prefix(cache, q, tq + MAX_NEW)
    return apply("extend_hidden", rows, mask, cache)[1]

  cache = jax.eval_shape(caches, params, setup["images"])
  c = setup["config"].model.llm
  heads = (c.num_kv_heads, c.head_dim)
  assert len(cache["k"]) == len(cache["prefix"]["k"]) == c.num_layers
  assert cache["prefix"]["k"][0].shape == (p, heads[0], tp, heads[1])
  assert cache["k"][0].shape == (p * q, heads[0], tq + MAX_NEW, heads[1])
  run = generate.program(model, max_new_tokens=MAX_NEW, eos_id=setup["eos"],
                         suppress_ids=decoder.suppress_ids)      # the decoder's program
  jaxpr = jax.make_jaxpr(run)(params, setup["images"], rows, np.tile(pr.lengths, p),
                              pr.prefix, None, None)
  per_row = [s for s in _avals(jaxpr)
             if p * q in s and ({tp, tp + tq, tp + tq + MAX_NEW} & set(s))]
  assert not per_row, per_row[:5]
  assert tp not in (p * q, tq + MAX_NEW)       # the shapes above are unambiguous
  # The compiled loop writes the cache in place: no copy of a cache buffer in its body.
  hlo = run.lower(params, setup["images"], rows, np.tile(pr.lengths, p), pr.prefix, None,
                  None).compile().as_text()
  suffix = r"f32\[%d,%d,%d,%d\]" % (p * q, heads[0], tq + MAX_NEW, heads[1])
  prefix = r"f32\[%d,%d,%d,%d\]" % (p, heads[0], tp, heads[1])
  bodies = [re.search(r"\n%s .*?\n}\n" % re.escape(name), hlo, re.S).group(0)
            for name in re.findall(r"while\(.*?body=(%[\w.\-]+)", hlo)]
  loop = max(bodies, key=lambda b: len(re.findall(suffix, b)))
  assert re.findall(suffix + r"\S* fusion\(", loop)                 # the in-place writes
  copies = re.findall(r"= (?:%s|%s)\S* (?:copy|transpose)\(" % (suffix, prefix), loop)
  assert not copies, copies


def test_sharded_decoding_gives_the_tokens_of_one_device(setup, decoder):
  """The same engine with persons over ('data', 'fsdp') = 4 and the weights sharded by
  the training rules on a (2, 2, 2) mesh of 8 simulated devices."""
  assert jax.device_count() == 8, "tests/conftest.py must set 8 host devices"
  mesh = jax.make_mesh((2, 2, 2), sharding.MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  sharded = decode.Decoder(setup["model"], setup["params"], setup["prompts"],
                           eos_id=setup["eos"], max_new_tokens=MAX_NEW, mesh=mesh,
                           rules=sharding.logical_rules(setup["config"].mesh))
  emb = sharded.params["llm"]["embed_tokens"]["embedding"]
  assert emb.sharding.spec != P() and emb.addressable_shards[0].data.shape != emb.shape
  images = np.random.default_rng(5).normal(size=(4, 32, 32, 3)).astype(np.float32)
  one, eight = decoder.shared(images), sharded.shared(images)
  np.testing.assert_array_equal(eight[0], one[0])
  np.testing.assert_array_equal(eight[2], one[2])
  np.testing.assert_allclose(eight[1], one[1], atol=1e-5)
  assert len(np.unique(one[0])) > 3
