"""Optimizer and train-step contracts on the real tiny VLM (configs/tiny.py:lora).

* gradient accumulation over k micro-batches equals one big batch (<= 1e-5);
* frozen params are bit-identical after steps; the optimizer state holds only the
  trainable leaves (LoRA factors + projector);
* the schedule warms up linearly and decays by cosine to end_lr_ratio * lr.
"""

import jax
import numpy as np
import optax
import pytest
from flax import traverse_util

from configs import tiny
from kptjax import sharding, train
from kptjax.data import pipeline, tokenizer
from kptjax.models import factory
from kptjax.training import optim


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
def one_device():
  return jax.make_mesh((1, 1, 1), sharding.MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def run_k1(one_device):
  """Two steps without accumulation: (initial params, [(state, metrics)] after each step)."""
  config = _config(grad_accum_steps=1)
  trainer = train.build(config, one_device)
  batches = _batches(config, 2)
  # Drop half of row 0's answer tokens: the two micro-batches (rows 0,2 and 1,3) then
  # hold different answer-token counts, and a mean of micro-batch means would differ.
  mask = batches[0]["loss_mask"]
  mask[0, np.flatnonzero(mask[0])[: int(mask[0].sum()) // 2]] = 0
  state = train.init_state(trainer, config)
  params0 = _host(state.params)
  out = []
  for b in batches:
    state, metrics = trainer.step(state, sharding.shard_batch(b, one_device))
    out.append((_host(state), _host(metrics)))
  return dict(config=config, trainer=trainer, params0=params0, batches=batches, out=out)


def test_grad_accumulation_equals_one_big_batch(run_k1, one_device):
  """k=2 micro-batches (answer-token counts differ between them) == one batch of 4."""
  config = _config(grad_accum_steps=2)
  trainer = train.build(config, one_device)
  params = jax.device_put(run_k1["params0"], trainer.state_shardings.params)
  state = train.init_state(trainer, config, params=params)
  state, metrics = trainer.step(state, sharding.shard_batch(run_k1["batches"][0], one_device))
  want_state, want_metrics = run_k1["out"][0]
  mask = run_k1["batches"][0]["loss_mask"]
  assert mask[0::2].sum() != mask[1::2].sum()
  for key in ("loss", "accuracy", "grad_norm", "answer_tokens"):
    np.testing.assert_allclose(metrics[key], want_metrics[key], rtol=1e-5, atol=1e-6)
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))),
                       _host(state.params), want_state.params)
  assert max(jax.tree.leaves(diffs)) <= 1e-5


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


def test_schedule_warmup_then_cosine():
  config = _config(lr=1e-3, warmup_ratio=0.1, end_lr_ratio=0.1)
  fn = optim.schedule(config.optim, 100)
  lrs = np.array([float(fn(s)) for s in range(101)])
  np.testing.assert_allclose(lrs[:11], np.linspace(0, 1e-3, 11), rtol=1e-5, atol=1e-9)
  assert np.all(np.diff(lrs[10:]) < 0)
  assert lrs[55] == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-4)   # half-way down the cosine
  assert lrs[100] == pytest.approx(1e-4, rel=1e-4)


def test_schedule_warmup_stable_decay():
  config = _config(lr=1e-3, warmup_ratio=0.1, end_lr_ratio=0.0, schedule="wsd",
                   decay_ratio=0.2)
  fn = optim.schedule(config.optim, 100)
  lrs = np.array([float(fn(s)) for s in range(101)])
  np.testing.assert_allclose(lrs[:11], np.linspace(0, 1e-3, 11), rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(lrs[10:81], 1e-3, rtol=1e-6)          # stable
  np.testing.assert_allclose(lrs[80:], np.linspace(1e-3, 0, 21), rtol=1e-5, atol=1e-9)


def test_split_merge_roundtrip():
  params = {"projector": {"kernel": np.ones((2, 3))},
            "llm": {"q": {"kernel": np.zeros((3, 3)), "lora_a": np.ones((3, 1)),
                          "lora_b": np.zeros((1, 3))}}}
  mask = optim.trainable_mask(params, "lora+projector")
  trainable, frozen = optim.split(params, mask)
  assert set(traverse_util.flatten_dict(trainable)) == {
      ("projector", "kernel"), ("llm", "q", "lora_a"), ("llm", "q", "lora_b")}
  assert set(traverse_util.flatten_dict(frozen)) == {("llm", "q", "kernel")}
  merged = optim.merge(trainable, frozen)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  assert optim.count(trainable) == 6 + 3 + 3
