"""The one train step (kptjax.training.step.make_train_step) of every model variant.

* LocLLM's VLM (configs/tiny.py:lora, the trainer's jitted step): gradient accumulation
  over k micro-batches equals one big batch (<= 1e-5); the unrolled towers
  (``model.unroll_layers``, with and without remat: no loop left in the program) give
  the scanned step (<= 1e-6); frozen params are bit-identical after steps; the optimizer
  state holds only the trainable leaves (LoRA factors + projector); the metrics count
  what the batch holds.
* Two loss terms on a toy model (LM + 2 x L1, answer-token and keypoint counts that differ
  between micro-batches): the loss and its parts equal a by-hand numpy computation and
  accumulation gives the one-batch update (1e-6).
* KptLLM on the tiny model: only LoRA, the projector, the prompt modules and the keypoint
  head change; L1 + LM loss; a few synthetic support/query pairs are over-fitted (the L1
  of the <keypoint> regression falls).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from configs import tiny
from kptjax import sharding
from kptjax.data import pipeline, tokenizer
from kptjax.data.tasks.kptllm import TaskEncoder
from kptjax.keypoints import get_spec
from kptjax.models import factory
from kptjax.models.vlm import dummy_inputs
from kptjax.training import losses, optim, trainer as trainer_lib
from kptjax.training.step import init_state, make_train_step


def _config(**optim_overrides):
  config = tiny.get_config("lora")
  with config.unlocked():
    config.mesh.shape.data = 1
    config.optim.update(optim_overrides)
  return config


def _batches(config, n):
  """The first n batches of the real training pipeline (tiny tokenizer, synthetic data)."""
  it = iter(pipeline.make_train_dataset(config, tokenizer.load_tokenizer("")))
  return [{k: next(it)[k] for k in factory.BATCH_KEYS} for _ in range(n)]


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


@pytest.fixture(scope="module")
def run_k1(one_device):
  """Two steps without accumulation: (initial params, [(state, metrics)] after each step)."""
  config = _config(grad_accum_steps=1)
  trainer = trainer_lib.build(config, one_device)
  batches = _batches(config, 2)
  # Drop half of row 0's answer tokens: the two micro-batches (rows 0,2 and 1,3) then
  # hold different answer-token counts, and a mean of micro-batch means would differ.
  mask = batches[0]["loss_mask"]
  mask[0, np.flatnonzero(mask[0])[: int(mask[0].sum()) // 2]] = 0
  state = trainer_lib.init_state(trainer, config)
  params0 = _host(state.params)
  out = []
  for b in batches:
    state, metrics = trainer.step(state, sharding.shard_batch(b, one_device))
    out.append((_host(state), _host(metrics)))
  return dict(config=config, trainer=trainer, params0=params0, batches=batches, out=out)


def test_grad_accumulation_equals_one_big_batch(run_k1, one_device):
  """k=2 micro-batches (answer-token counts differ between them) == one batch of 4."""
  config = _config(grad_accum_steps=2)
  trainer = trainer_lib.build(config, one_device)
  params = jax.device_put(run_k1["params0"], trainer.state_shardings.params)
  state = trainer_lib.init_state(trainer, config, params=params)
  state, metrics = trainer.step(state, sharding.shard_batch(run_k1["batches"][0], one_device))
  want_state, want_metrics = run_k1["out"][0]
  mask = run_k1["batches"][0]["loss_mask"]
  assert mask[0::2].sum() != mask[1::2].sum()
  for key in ("loss", "accuracy", "grad_norm", "answer_tokens"):
    np.testing.assert_allclose(metrics[key], want_metrics[key], rtol=1e-5, atol=1e-6)
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))),
                       _host(state.params), want_state.params)
  assert max(jax.tree.leaves(diffs)) <= 1e-5


@pytest.mark.parametrize("remat_policy", ["nothing_saveable", "none"])
def test_unrolled_layers_equal_the_scanned_step(run_k1, one_device, remat_policy):
  """``model.unroll_layers`` (both towers' stacked blocks as straight-line code, the
  same params) gives the scanned step's init, metrics and update."""
  config = _config(grad_accum_steps=1)
  with config.unlocked():
    config.model.unroll_layers = True
    config.model.remat_policy = remat_policy
  trainer = trainer_lib.build(config, one_device)
  state = trainer_lib.init_state(trainer, config)
  init = jax.tree.map(np.array_equal, _host(state.params), run_k1["params0"])
  assert all(jax.tree.leaves(init))
  batch = sharding.shard_batch(run_k1["batches"][0], one_device)
  assert "stablehlo.while" in run_k1["trainer"].step.lower(state, batch).as_text()
  assert "stablehlo.while" not in trainer.step.lower(state, batch).as_text()
  state, metrics = trainer.step(state, batch)
  want_state, want_metrics = run_k1["out"][0]
  for key in ("loss", "accuracy", "grad_norm"):
    np.testing.assert_allclose(metrics[key], want_metrics[key], rtol=1e-6, atol=1e-7)
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))),
                       _host(state.params), want_state.params)
  assert max(jax.tree.leaves(diffs)) <= 1e-6


def test_bench_model_variants_refuse_a_field_the_model_does_not_have():
  """experiments/bench_train.py --kptjax_variants: each variant is config.model with the
  overrides (optional fields included), and a typo is refused, not a duplicate row."""
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "bench_train.py"
  spec = importlib.util.spec_from_file_location("bench_train", path)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  config = _config()
  variant = bench.model_variant(config, "remat_policy=none, unroll_layers=True,attention=recompute")
  assert (variant.model.remat_policy, variant.model.unroll_layers,
          variant.model.attention) == ("none", True, "recompute")
  assert config.model.remat_policy == "nothing_saveable" and "unroll_layers" not in config.model
  with pytest.raises(ValueError, match=r"config.model has no \['remat_polcy'\]"):
    bench.model_variant(config, "remat_polcy=none")
  with pytest.raises(ValueError, match="expected key=value"):
    bench.model_variant(config, "unroll_layers")


def test_frozen_params_bit_identical_and_no_optimizer_state(run_k1):
  mask = traverse_util.flatten_dict(run_k1["trainer"].mask)
  before = traverse_util.flatten_dict(run_k1["params0"])
  after = traverse_util.flatten_dict(run_k1["out"][-1][0].params)
  trainable = {k for k, m in mask.items() if m}
  assert trainable and all(k[0] == "projector" or k[-1] in ("lora_a", "lora_b")
                           for k in trainable)
  assert any(k[0] == "vit" for k in trainable) and any(k[0] == "llm" for k in trainable)
  for key in before:
    if key in trainable:
      continue
    assert after[key].dtype == before[key].dtype
    np.testing.assert_array_equal(after[key], before[key], err_msg="/".join(key))
  changed = [k for k in trainable if not np.array_equal(after[k], before[k])]
  assert any(k[0] == "projector" for k in changed)
  assert any(k[-1] == "lora_b" for k in changed)

  # Adam moments exist for exactly the trainable leaves; nothing else but step counters.
  opt_state = run_k1["out"][-1][0].opt_state
  adam = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(
      s, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)]
  assert len(adam) == 1
  for moments in (adam[0].mu, adam[0].nu):
    flat = traverse_util.flatten_dict(moments)
    assert set(flat) == trainable
    assert all(flat[k].shape == before[k].shape for k in flat)
  n_trainable = sum(before[k].size for k in trainable)
  n_state = sum(x.size for x in jax.tree.leaves(opt_state))
  assert 2 * n_trainable <= n_state <= 2 * n_trainable + 8


def test_metrics_of_a_step(run_k1):
  m = run_k1["out"][0][1]
  b = run_k1["batches"][0]
  assert np.isfinite(m["loss"]) and 0.0 <= m["accuracy"] <= 1.0
  assert m["answer_tokens"] == b["loss_mask"].sum()
  assert m["input_tokens"] == b["input_mask"].sum()
  assert m["grad_norm"] > 0
  assert m["lr"] == pytest.approx(float(optim.schedule(run_k1["config"].optim,
                                                       run_k1["config"].train.num_steps)(0)))


# ---------------------------------------------------------------- two terms, by hand
V, D, R = 11, 4, 3


class _Toy(nn.Module):
  """Embedding -> hidden [B,T,D]; logits [B,T,V]; the first R positions -> xy [B,R,2]."""

  def setup(self):
    self.embed = nn.Embed(V, D)
    self.out = nn.Dense(V)
    self.head = nn.Dense(2)

  def __call__(self, tokens):
    h = self.embed(tokens)
    if self.is_initializing():
      self.out(h)                        # create the output layer's params
    return h, self.head(h[:, :R])

  def logits(self, h):
    return self.out(h)


def _toy_forward(model, params, batch, **kwargs):
  del kwargs   # no dropout in the toy
  hidden, xy = model.apply({"params": params}, batch["tokens"])
  return dict(hidden=hidden, xy=xy)


def _toy_batch():
  rng = np.random.default_rng(0)
  b, t = 4, 6
  loss_mask = np.ones((b, t), np.float32)
  loss_mask[0, :4] = 0                   # micro-batches (rows 0,2 / 1,3) count differently
  kpt_mask = np.ones((b, R), np.float32)
  kpt_mask[1, 1:] = 0
  return dict(tokens=rng.integers(0, V, (b, t)).astype(np.int32),
              targets=rng.integers(0, V, (b, t)).astype(np.int32), loss_mask=loss_mask,
              input_mask=np.ones((b, t), bool), kpt_xy=rng.uniform(0, 1, (b, R, 2)).astype(
                  np.float32), kpt_mask=kpt_mask)


def test_two_loss_terms_by_hand_and_exact_under_accumulation():
  model, batch = _Toy(), _toy_batch()
  params = model.init(jax.random.key(0), batch["tokens"])["params"]
  mask = jax.tree.map(lambda _: True, params)
  tx = optax.sgd(0.1)
  terms = (losses.LM_TERM, losses.l1_term(2.0))

  def one_step(k):
    step = jax.jit(make_train_step(model, tx, mask, forward=_toy_forward, loss_terms=terms,
                                   lr_schedule=optax.constant_schedule(0.1), rules=(),
                                   grad_accum_steps=k))
    state, metrics = step(init_state(params, tx, mask), batch)
    return jax.device_get(state.params), jax.device_get(metrics)

  want_params, m = one_step(1)
  hidden, xy = model.apply({"params": params}, batch["tokens"])
  logits = np.asarray(model.apply({"params": params}, hidden, method="logits"), np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  lm = (ce * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
  l1 = (np.abs(np.asarray(xy) - batch["kpt_xy"]).sum(-1) * batch["kpt_mask"]).sum() / (
      batch["kpt_mask"].sum())
  np.testing.assert_allclose([m["lm_loss"], m["l1"], m["loss"]], [lm, l1, lm + 2.0 * l1],
                             rtol=1e-6)
  assert (m["answer_tokens"], m["keypoints"]) == (batch["loss_mask"].sum(),
                                                  batch["kpt_mask"].sum())
  assert m["input_tokens"] == batch["input_mask"].sum() and 0.0 <= m["accuracy"] <= 1.0
  got_params, got = one_step(2)
  for key in ("loss", "lm_loss", "l1", "accuracy", "grad_norm", "answer_tokens", "keypoints"):
    np.testing.assert_allclose(got[key], m[key], rtol=1e-6, err_msg=key)
  for a, b in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------- KptLLM
PAIRS = 4


def _kpt_config():
  c = tiny.get_config("lora").unlock()
  c.model.kpt.enabled = True
  c.model.remat_policy = "none"
  c.data.coord_format, c.data.rounds, c.data.max_len = "keypoint_token", 1, 0
  c.optim.lr, c.optim.schedule, c.optim.warmup_ratio = 1e-2, "constant", 0.0
  c.optim.weight_decay = 0.0
  return c.lock()


def _blob(side, xy, rng):
  """A noisy image with a bright 6 px square centred at xy (normalized)."""
  img = rng.normal(0.0, 0.3, (side, side, 3)).astype(np.float32)
  cx, cy = (np.asarray(xy) * side).astype(int)
  img[max(cy - 3, 0):cy + 3, max(cx - 3, 0):cx + 3] = 2.0
  return img


def _pairs(config):
  """PAIRS support/query pairs of one keypoint (the 'nose' of coco17: a bright square)."""
  rng = np.random.default_rng(0)
  side = config.model.vit.image_size
  enc = TaskEncoder(tokenizer.load_tokenizer(""), config.data, 16,
                    prompt_token_id=config.model.kpt.prompt_token_id,
                    keypoint_token_id=config.model.kpt.keypoint_token_id,
                    image_token_id=config.model.image_token_id)
  spec = get_spec("coco17")
  rows = []
  for _ in range(PAIRS):
    q, s = rng.uniform(0.2, 0.8, 2), rng.uniform(0.2, 0.8, 2)
    kp = np.zeros((17, 3), np.float32)
    kp[0] = (q[0] * side, q[1] * side, 2)
    ex = enc.encode_task("visual", kp, side, spec, None)
    rows.append(dict(image=_blob(side, q, rng), support_image=_blob(side, s, rng)[None],
                     support_xy=s[None, None].astype(np.float32),
                     support_mask=np.ones((1, 1), np.float32),
                     **{k: ex[k] for k in ("tokens", "targets", "loss_mask", "input_mask",
                                           "kpt_xy", "kpt_mask")}))
  return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


def test_l1_stats_by_hand():
  out = losses.l1_stats(jnp.array([[[0.1, 0.2], [0.5, 0.5]]]), jnp.array([[[0.3, 0.1], [0.0, 0.0]]]),
                 jnp.array([[1.0, 0.0]]))
  assert float(out["l1_sum"]) == pytest.approx(0.3) and float(out["keypoints"]) == 1.0


# Tiny graphs compile twice as fast without XLA's backend optimizations; values agree.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
STEPS = 40


@pytest.fixture(scope="module")
def kpt_run():
  """Init, one update (kept), then STEPS - 1 more on the same PAIRS pairs."""
  config = _kpt_config()
  batch = _pairs(config)
  variant = factory.variant_of(config)
  assert variant.name == "kptllm" and [t.name for t in variant.loss_terms] == ["lm_loss", "l1"]
  model = variant.model
  init = jax.jit(lambda key: model.init(key, *dummy_inputs(config.model),
                                        **variant.init_kwargs()),
                 compiler_options=FAST_COMPILE)
  params = nn.meta.unbox(init(jax.random.key(0, impl="unsafe_rbg"))["params"])
  mask = optim.trainable_mask(params, config.optim.trainable)
  tx = optim.make_optimizer(config.optim, STEPS)
  step = jax.jit(make_train_step(
      model, tx, mask, forward=variant.forward, loss_terms=variant.loss_terms,
      lr_schedule=optim.schedule(config.optim, STEPS), rules=config.mesh.rules),
      compiler_options=FAST_COMPILE)
  state, first = step(init_state(params, tx, mask), batch)
  after_one = jax.device_get(state.params)
  l1 = [float(first["l1"])]
  for _ in range(STEPS - 1):
    state, m = step(state, batch)
    l1.append(float(m["l1"]))
  return dict(batch=batch, params=params, mask=mask, after_one=after_one, first=first, l1=l1)


def test_kptllm_update_changes_only_lora_projector_prompt_modules_and_head(kpt_run):
  assert kpt_run["batch"]["kpt_mask"].shape == (PAIRS, 1)
  before = traverse_util.flatten_dict(kpt_run["params"])
  after = traverse_util.flatten_dict(kpt_run["after_one"])
  trained = traverse_util.flatten_dict(kpt_run["mask"])
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  assert changed <= {k for k, m in trained.items() if m}     # frozen leaves: bit-identical
  for module in ("keypoint_head", "prompt_encoder", "prompt_extractor", "prompt_projector",
                 "projector"):
    assert any(k[0] == module for k in changed), module
  assert any(k[0] == "llm" and k[-1] == "lora_b" for k in changed)
  assert not any(k[0] in ("vit", "llm") and k[-1] not in ("lora_a", "lora_b") for k in changed)
  first = kpt_run["first"]
  assert float(first["loss"]) == pytest.approx(
      float(first["lm_loss"]) + 2.0 * float(first["l1"]), rel=1e-5)
  assert float(first["keypoints"]) == PAIRS


def test_kptllm_overfits_support_query_pairs(kpt_run):
  l1 = kpt_run["l1"]
  assert np.mean(l1[-3:]) < 0.5 * l1[0], l1
