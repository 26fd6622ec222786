"""Sharding contracts under 8 simulated CPU devices (tests/conftest.py sets XLA_FLAGS).

The same two batches through the tiny VLM (every param trained) on one device and on a
(data=2, fsdp=2, tensor=2) mesh give the same losses and updated params (<= 1e-5), and
params / optimizer moments / batches carry the PartitionSpecs the rules table implies.
"""

import jax
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from configs import tiny
from kptjax import sharding
from kptjax.data import pipeline, tokenizer
from kptjax.errors import ConfigError
from kptjax.models import factory
from kptjax.training import trainer as trainer_lib

NUM_STEPS = 2


def _mesh(shape):
  n = int(np.prod(shape))
  return jax.make_mesh(shape, sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=jax.devices()[:n])


def _train(config, mesh, params0, batches):
  trainer = trainer_lib.build(config, mesh)
  state = trainer_lib.init_state(trainer, config,
                           params=jax.device_put(params0, trainer.state_shardings.params))
  losses = []
  for b in batches:
    state, metrics = trainer.step(state, sharding.shard_batch(b, mesh))
    losses.append(float(metrics["loss"]))
  return trainer, state, losses


@pytest.fixture(scope="module")
def runs():
  assert jax.device_count() == 8, "tests/conftest.py must set 8 host devices"
  config = tiny.get_config()
  it = iter(pipeline.make_train_dataset(config, tokenizer.load_tokenizer("")))
  batches = [{k: next(it)[k] for k in factory.BATCH_KEYS} for _ in range(NUM_STEPS)]
  one = _mesh((1, 1, 1))
  trainer1 = trainer_lib.build(config, one)
  params0 = jax.device_get(trainer1.init_params(jax.random.key(0)))
  _, state1, losses1 = _train(config, one, params0, batches)
  trainer8, state8, losses8 = _train(config, _mesh((2, 2, 2)), params0, batches)
  return dict(params0=params0, state1=jax.device_get(state1), losses1=losses1,
              trainer8=trainer8, state8=state8, losses8=losses8, batch=batches[0])


def test_mesh_222_matches_one_device(runs):
  np.testing.assert_allclose(runs["losses8"], runs["losses1"], rtol=0, atol=1e-5)
  p1 = traverse_util.flatten_dict(runs["state1"].params)
  p8 = traverse_util.flatten_dict(jax.device_get(runs["state8"].params))
  p0 = traverse_util.flatten_dict(runs["params0"])
  for key, want in p1.items():
    np.testing.assert_allclose(p8[key], want, rtol=0, atol=1e-5, err_msg="/".join(key))
  assert not np.array_equal(p1[("llm", "embed_tokens", "embedding")],
                            p0[("llm", "embed_tokens", "embedding")])


EXPECTED_SPECS = {
    ("llm", "embed_tokens", "embedding"): P("tensor", "fsdp"),          # (vocab, embed)
    ("llm", "lm_head", "kernel"): P("fsdp", "tensor"),                  # (embed, vocab)
    ("llm", "layers", "self_attn", "q_proj", "kernel"): P(None, "fsdp", "tensor"),
    ("llm", "layers", "self_attn", "o_proj", "kernel"): P(None, "tensor", "fsdp"),
    ("llm", "layers", "mlp", "down_proj", "kernel"): P(None, "tensor", "fsdp"),
    ("llm", "norm", "scale"): P("fsdp"),
    ("vit", "layers", "mlp", "fc1", "kernel"): P(None, "fsdp", "tensor"),
    ("vit", "embeddings", "patch_kernel"): P(None, "fsdp"),             # (patch, vit_embed)
}


def test_params_and_optimizer_state_carry_expected_specs(runs):
  params = traverse_util.flatten_dict(runs["state8"].params)
  for key, spec in EXPECTED_SPECS.items():
    assert params[key].sharding.spec == spec, "/".join(key)
  emb = params[("llm", "embed_tokens", "embedding")]
  v, d = emb.shape
  assert {s.data.shape for s in emb.addressable_shards} == {(v // 2, d // 2)}
  # Adam moments are sharded like their params (FSDP shards the optimizer state too).
  adam = runs["state8"].opt_state[1][0]
  mu = traverse_util.flatten_dict(adam.mu)
  for key, spec in EXPECTED_SPECS.items():
    assert mu[key].sharding.spec == spec, "/".join(key)


def test_batch_split_over_data_and_fsdp(runs):
  mesh = runs["trainer8"].mesh
  batch = sharding.shard_batch(runs["batch"], mesh)
  tokens = batch["tokens"]
  assert tokens.sharding.spec == P(("data", "fsdp"))
  b, t = runs["batch"]["tokens"].shape
  assert {s.data.shape for s in tokens.addressable_shards} == {(b // 4, t)}
  np.testing.assert_array_equal(np.asarray(tokens), runs["batch"]["tokens"])


def test_mesh_shape_resolves_minus_one_and_rejects_bad_shapes():
  assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
  assert sharding.mesh_shape({"data": 2, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
  with pytest.raises(ConfigError):
    sharding.mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)
  with pytest.raises(ConfigError):
    sharding.mesh_shape({"data": 2, "fsdp": 1, "tensor": 1}, 8)
  with pytest.raises(ConfigError):
    sharding.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)


def test_logical_to_mesh_spec_follows_rule_order():
  rules = sharding.logical_rules(tiny.get_config().mesh)
  assert sharding.logical_to_mesh_spec(("embed", "mlp"), rules) == P("fsdp", "tensor")
  # 'embed' comes before 'vit_embed' in the table, so it takes 'fsdp'.
  assert sharding.logical_to_mesh_spec(("vit_embed", "embed"), rules) == P(None, "fsdp")
  assert sharding.logical_to_mesh_spec(("patch", "patch", None), rules) == P(None, None, None)
  # A repeated name (flax raises) takes its mesh axis at the first dimension only.
  assert sharding.logical_to_mesh_spec(("embed", "embed"), rules) == P("fsdp", None)
  assert sharding.logical_to_mesh_spec(("unknown",), rules) == P(None)
  mesh = _mesh((2, 2, 2))
  assert sharding.fit_spec(P("fsdp", "tensor"), (6, 3), mesh) == P("fsdp", None)
