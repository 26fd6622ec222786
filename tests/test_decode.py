"""Greedy decoding: cache vs full forwards, shared prefix vs per-keypoint rows, parity
with transformers' generate, constrained decoding; KptLLM's <keypoint> regression on the
same Decoder (the cached path reads the same (x, y) at the <keypoint> token as teacher
forcing over the whole sequence, for right-padded rows of different lengths with prompt
slots; a row that never emits <keypoint> gets it forced).

One tiny model for every test: random Hugging Face DINOv2 + Llama checkpoints shaped
like configs/tiny.py, converted with ``kptjax.convert.load_vlm`` (so the torch reference
holds the very same weights), the bundled tiny tokenizer, and the LocLLM template with
COCO keypoint names and descriptions.
"""

import importlib.util
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import tiny
from kptjax import convert, errors, sharding
from kptjax.data import conversation, tokenizer as tok_lib
from kptjax.inference import decode, generate, parsing
from kptjax.inference.prompts import build_prompts
from kptjax.keypoints import get_spec
from kptjax.models import kptllm, llama, vlm

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
  prompts = build_prompts(tokenizer, config, names, descriptions,
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
  """Prefix = <s> + 'Image: ' + N image slots + newline + the queries' shared start
  ('Keypoint: '); prefix + query = the training encoder's prefix + question, token for
  token, and each question ends with 'Answer: '."""
  pr, tok, config = setup["prompts"], setup["tokenizer"], setup["config"]
  n = vlm.num_image_tokens(config.model)
  assert pr.prefix[0] == tok.bos_token_id
  assert (pr.prefix == config.model.image_token_id).sum() == n
  image_prefix = conversation.encode_prefix(tok, config.data, n,
                                            image_token_id=int(config.model.image_token_id))
  assert len(pr.prefix) > len(image_prefix)        # the shared 'Keypoint: ' moved there
  full, full_len = pr.full_rows()
  for name, description, row, length in zip(setup["names"], setup["descriptions"], full,
                                            full_len):
    want = list(image_prefix) + list(conversation.encode_query(tok, config.data, name,
                                                               description))
    assert list(row[:length]) == want
    text = tok.decode(row[len(image_prefix):length])
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


# ---------------------------------------------------------------------------
# KptLLM: <keypoint> regression on the same Decoder.

KPT_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@pytest.fixture(scope="module")
def kpt_setup():
  c = tiny.get_config().unlock()
  c.model.kpt.enabled = True
  c.model.remat_policy = "none"
  config = c.lock()
  model = kptllm.KptLLM(config.model)
  params = kptllm.init_params(config.model, jax.random.key(0, impl="unsafe_rbg"))
  return config, model, params


def test_keypoint_decoder_on_a_mesh_places_the_head_and_prompt_modules(kpt_setup):
  """Decoder(mesh=) shards the variant's own params (KptLLM's prompt modules and
  regression head included) by the training rules, leaf for leaf."""
  config, model, params = kpt_setup
  mesh = jax.make_mesh((2, 2, 2), sharding.MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  sharded = decode.Decoder(model, params, eos_id=2, max_new_tokens=4, mesh=mesh,
                           rules=sharding.logical_rules(config.mesh))
  assert set(params) - set(params["llm"]) and set(sharded.params) == set(params)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(sharded.params),
                          jax.tree.leaves(params)):
    assert a.sharding.mesh == mesh, path
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_cached_keypoint_equals_teacher_forcing(kpt_setup):
  config, model, params = kpt_setup
  k, n, side = config.model.kpt, 16, config.model.vit.image_size
  p, kp = k.prompt_token_id, k.keypoint_token_id
  rows = [[1] + [4] * n + [7, p, 9, 11], [1] + [4] * n + [7, p, 9, 11, 12, 13]]
  t = max(map(len, rows))
  tokens = np.zeros((2, t), np.int32)
  mask = np.zeros((2, t), bool)
  for i, r in enumerate(rows):
    tokens[i, :len(r)], mask[i, :len(r)] = r, True
  images = jax.random.normal(jax.random.key(2), (2, side, side, 3))
  support = jax.random.normal(jax.random.key(3), (2, 1, side, side, 3))
  sxy, smask = jnp.array([[[[0.3, 0.6]]], [[[0.8, 0.1]]]]), jnp.ones((2, 1, 1))
  prompt = jax.jit(lambda prm: model.apply({"params": prm}, support, sxy, smask,
                                           method="embed_prompts"),
                   compiler_options=KPT_FAST_COMPILE)(params)
  xy, generated = decode.generate_keypoints(
      model, params, images, jnp.asarray(tokens), jnp.asarray(mask), prompt_embeds=prompt,
      max_new_tokens=1, eos_id=2)
  assert generated.tolist() == [[kp], [kp]]                  # forced at the last step
  # Teacher forcing over prompt + <keypoint> (row-wise, each at its own length).
  full = np.zeros((2, t + 1), np.int32)
  fmask = np.zeros((2, t + 1), bool)
  for i, r in enumerate(rows):
    full[i, :len(r) + 1], fmask[i, :len(r) + 1] = r + [kp], True
  _, ref = jax.jit(lambda prm: model.apply(
      {"params": prm}, images, jnp.asarray(full), jnp.asarray(fmask), support_images=support,
      support_xy=sxy, support_mask=smask, num_keypoint_slots=1),
      compiler_options=KPT_FAST_COMPILE)(params)
  np.testing.assert_allclose(xy, np.asarray(ref)[:, 0], atol=2e-5)
  assert np.all((xy > 0) & (xy < 1))


def test_shared_prefix_equals_rows_and_teacher_forcing(kpt_setup):
  """2 persons x 2 questions with prompt slots, 4 new tokens: the image header prefilled
  once per person (prefix_len) gives the per-row path's tokens and xy, and both match
  teacher forcing over prompt + generated tokens: every free token is the argmax of the
  full forward and xy is the head at the <keypoint> input token."""
  config, model, params = kpt_setup
  k, n, side = config.model.kpt, 16, config.model.vit.image_size
  slot, kp, eos, m = k.prompt_token_id, k.keypoint_token_id, 2, 4
  prefix = [1] + [4] * n + [7]
  queries = [[slot, 9, 11], [slot, 9, 11, 12, 13]]
  rows = [prefix + q for q in queries] * 2                    # person-major: p0q0 p0q1 ...
  t = max(map(len, rows))
  tokens, mask = np.zeros((4, t), np.int32), np.zeros((4, t), bool)
  for i, r in enumerate(rows):
    tokens[i, :len(r)], mask[i, :len(r)] = r, True
  images = jax.random.normal(jax.random.key(4), (2, side, side, 3))
  support = jax.random.normal(jax.random.key(5), (4, 1, side, side, 3))
  sxy = jax.random.uniform(jax.random.key(6), (4, 1, 1, 2))
  smask = jnp.ones((4, 1, 1))
  prompt = jax.jit(lambda prm: model.apply({"params": prm}, support, sxy, smask,
                                           method="embed_prompts"),
                   compiler_options=KPT_FAST_COMPILE)(params)
  row_images = jnp.repeat(images, 2, axis=0)
  xy_rows, gen_rows = decode.generate_keypoints(
      model, params, row_images, tokens, mask, prompt_embeds=prompt, max_new_tokens=m,
      eos_id=eos)
  xy, gen = decode.generate_keypoints(
      model, params, images, tokens, mask, prompt_embeds=prompt, max_new_tokens=m,
      eos_id=eos, prefix_len=len(prefix))
  np.testing.assert_array_equal(gen, gen_rows)
  np.testing.assert_allclose(xy, xy_rows, atol=2e-5)
  # Teacher forcing: each row + its answer up to and including the <keypoint>.
  answers = [list(g[:list(g).index(kp) + 1]) for g in gen]
  full = np.zeros((4, t + m), np.int32)
  fmask = np.zeros((4, t + m), bool)
  for i, (r, a) in enumerate(zip(rows, answers)):
    full[i, :len(r) + len(a)], fmask[i, :len(r) + len(a)] = r + a, True
  logits, ref = jax.jit(lambda prm: model.apply(
      {"params": prm}, row_images, jnp.asarray(full), jnp.asarray(fmask),
      support_images=support, support_xy=sxy, support_mask=smask, num_keypoint_slots=1),
      compiler_options=KPT_FAST_COMPILE)(params)
  logits = np.asarray(logits)
  free = 0
  for i, (r, a) in enumerate(zip(rows, answers)):
    for j, token in enumerate(a):
      forced = token == kp and (j == m - 1 or (j and a[j - 1] == eos))
      if not forced:
        assert np.argmax(logits[i, len(r) + j - 1]) == token, (i, j)
        free += 1
  assert free > 0
  np.testing.assert_allclose(xy, np.asarray(ref)[:, 0], atol=2e-5)
