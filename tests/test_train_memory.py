"""The train step's memory layout on the tiny config (8 simulated CPU devices, conftest).

* the chunked loss (``losses.lm_stats``) has the plain loss's value and gradient
  (f32, 1e-6): the logits of the whole batch are never needed, and chunks without an
  answer token are not computed;
* attention by ``jax.nn.dot_product_attention`` ('xla') and by ``folded_attention``
  equals the explicit einsums, grouped-query heads and causal + padding masks included,
  and so does the whole VLM;
* on a (data=1, fsdp=8) mesh the residual stream is constrained to the batch axes in
  the lowered step, the step (chunked loss) equals the one-device step (plain loss), and
  the compiled step's temporaries per device fall with the number of devices.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import tiny
from kptjax import sharding
from kptjax.data import pipeline, tokenizer
from kptjax.models import factory, layers, vlm
from kptjax.models.llama import causal_mask
from kptjax.training import losses, trainer as trainer_lib


def _mesh(shape):
  n = int(np.prod(shape))
  return jax.make_mesh(shape, sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=jax.devices()[:n])


def _batches(config, n):
  it = iter(pipeline.make_train_dataset(config, tokenizer.load_tokenizer("")))
  return [{k: next(it)[k] for k in factory.BATCH_KEYS} for _ in range(n)]


@pytest.fixture(scope="module")
def setup():
  config = tiny.get_config()
  with config.unlocked():
    config.train.batch_size = 8
  params = vlm.init_params(config.model, jax.random.key(0))
  return config, params, _batches(config, 2)


def test_chunked_loss_equals_plain_loss_value_and_gradient(setup):
  config, params, batches = setup
  batch = batches[0]
  model = vlm.VLM(config.model)
  targets, mask = jnp.asarray(batch["targets"]), jnp.asarray(batch["loss_mask"])

  def plain(p):
    logits = model.apply({"params": p}, batch["image"], batch["tokens"], batch["input_mask"])
    s = losses.token_stats(logits, targets, mask)
    return s["loss_sum"], s

  def chunked(p, chunk):
    h = model.apply({"params": p}, batch["image"], batch["tokens"], batch["input_mask"],
                    return_hidden=True)
    s = losses.lm_stats(lambda x: model.apply({"params": p}, x, method="logits"), h,
                            targets, mask, chunk)
    return s["loss_sum"], s

  (want, want_stats), want_grad = jax.value_and_grad(plain, has_aux=True)(params)
  t = batch["tokens"].shape[1]
  for chunk in (7, t // 4):          # 7 does not divide T: the tail is padded and masked
    assert t % 7
    (got, stats), grad = jax.jit(jax.value_and_grad(chunked, has_aux=True),
                                 static_argnums=1)(params, chunk)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for k in losses.STAT_KEYS:
      np.testing.assert_allclose(stats[k], want_stats[k], rtol=1e-6, err_msg=k)
    # Relative to the largest gradient: some are exactly zero in exact arithmetic (the
    # ViT key bias shifts every logit of a query equally) and only float noise here.
    flat_want = traverse_util.flatten_dict(want_grad)
    scale = max(float(np.abs(g).max()) for g in flat_want.values())
    for key, g in traverse_util.flatten_dict(grad).items():
      np.testing.assert_allclose(np.asarray(g) / scale, np.asarray(flat_want[key]) / scale,
                                 rtol=0, atol=1e-6, err_msg="/".join(key))


def test_chunked_loss_computes_only_the_chunks_that_hold_answers():
  """Answers are moved to the front of their row, so only ceil(max answers per row /
  chunk) chunks run the output layer (counted by a callback in the logits function);
  the stats and the gradient equal the plain loss's, also for a row without answers
  and a batch without any."""
  r = np.random.RandomState(3)
  b, t, d, v, chunk = 3, 21, 8, 11, 4
  hidden = jnp.asarray(r.randn(b, t, d), jnp.float32)
  w = jnp.asarray(r.randn(d, v), jnp.float32)
  targets = jnp.asarray(r.randint(0, v, (b, t)), jnp.int32)
  mask = np.zeros((b, t), np.float32)
  mask[0, [2, 9, 10, 17, 20]] = 1        # 5 answers, scattered: 2 chunks of 4
  mask[1, [0, 13]] = 1
  calls = []

  def logits_fn(h):
    jax.debug.callback(lambda: calls.append(1))
    return h @ w

  def plain(h, m):
    s = losses.token_stats(h @ w, targets, m)
    return s["loss_sum"], s

  def chunked(h, m):
    s = losses.lm_stats(logits_fn, h, targets, m, chunk)
    return s["loss_sum"], s

  for m, want_calls in ((mask, 2), (np.zeros_like(mask), 0)):
    m = jnp.asarray(m)
    calls.clear()
    stats = jax.jit(lambda h, m: chunked(h, m)[1])(hidden, m)
    jax.effects_barrier()
    assert len(calls) == want_calls, (len(calls), want_calls)
    (want, want_stats), want_grad = jax.value_and_grad(plain, has_aux=True)(hidden, m)
    (got, _), grad = jax.jit(jax.value_and_grad(chunked, has_aux=True))(hidden, m)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for k in losses.STAT_KEYS:
      np.testing.assert_allclose(stats[k], want_stats[k], rtol=1e-6, err_msg=k)
    np.testing.assert_allclose(grad, want_grad, rtol=0, atol=1e-6)
  assert float(jnp.abs(want_grad).sum()) == 0.0    # the empty batch: no gradient at all


def test_dot_product_attention_equals_einsum_attention():
  r = np.random.RandomState(0)
  q = jnp.asarray(r.randn(3, 9, 4, 8), jnp.float32)
  k = jnp.asarray(r.randn(3, 9, 2, 8), jnp.float32)     # 2 kv heads: grouped queries
  v = jnp.asarray(r.randn(3, 9, 2, 8), jnp.float32)
  real = jnp.asarray([[1] * 9, [1] * 6 + [0] * 3, [1] * 2 + [0] * 7], bool)
  for mask in (None, causal_mask(real)):
    want, _ = layers.attention(q, k, v, mask, impl="einsum")
    got, _ = layers.attention(q, k, v, mask, impl="xla")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_folded_attention_equals_einsum_attention_values_and_gradients():
  """'folded' (batch and kv heads in one batch dimension, normalized after the value
  matmul): the einsums' values and gradients, grouped-query heads, causal + padding
  masks (a row with no key to attend to included) and bf16."""
  r = np.random.RandomState(2)
  q = jnp.asarray(r.randn(3, 9, 4, 8), jnp.float32)
  k, v = (jnp.asarray(r.randn(3, 7, 2, 8), jnp.float32) for _ in range(2))
  w = jnp.asarray(r.randn(3, 9, 4, 8), jnp.float32)
  mask = jnp.asarray(r.rand(3, 9, 7) > 0.3).at[1, 4].set(False)
  keys = jnp.asarray([[1] * 7, [1] * 5 + [0] * 2, [1] * 2 + [0] * 5], bool)   # padding
  lower_triangle = jnp.tril(jnp.ones((3, 9, 7), bool)) & keys[:, None]
  for m in (None, mask, lower_triangle):
    def loss(impl):
      return lambda q, k, v: jnp.sum(layers.attention(q, k, v, m, impl=impl)[0] * w)
    want = jax.value_and_grad(loss("einsum"), argnums=(0, 1, 2))(q, k, v)
    got = jax.jit(jax.value_and_grad(loss("folded"), argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-5)
    for g, g_want in zip(got[1], want[1]):
      np.testing.assert_allclose(g, g_want, rtol=0, atol=1e-5)
  bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  out, _ = layers.attention(*bf, mask, impl="folded")
  ref, _ = layers.attention(*bf, mask, impl="einsum")
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                             rtol=0, atol=2e-2)


def test_recompute_attention_is_exact_and_stores_no_scores():
  """'recompute': the einsum attention's values and gradients, with no [B,N,T,S] tensor
  among the residuals that backward keeps (the einsums keep the probabilities)."""
  from jax._src.ad_checkpoint import saved_residuals
  r = np.random.RandomState(1)
  q = jnp.asarray(r.randn(3, 9, 4, 8), jnp.float32)
  k, v = (jnp.asarray(r.randn(3, 9, 2, 8), jnp.float32) for _ in range(2))
  mask = causal_mask(jnp.asarray([[1] * 9, [1] * 6 + [0] * 3, [1] * 2 + [0] * 7], bool))
  w = jnp.asarray(r.randn(3, 9, 4, 8), jnp.float32)

  def loss(impl):
    return lambda q, k, v: jnp.sum(layers.attention(q, k, v, mask, impl=impl)[0] * w)
  want = jax.value_and_grad(loss("einsum"), argnums=(0, 1, 2))(q, k, v)
  got = jax.value_and_grad(loss("recompute"), argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  for g, g_want in zip(got[1], want[1]):
    np.testing.assert_allclose(g, g_want, rtol=0, atol=1e-6)

  def score_sized(impl):
    return [aval.shape for aval, _ in saved_residuals(loss(impl), q, k, v)
            if aval.size >= 3 * 4 * 9 * 9]
  assert score_sized("einsum"), "the einsums should keep their [B,N,T,S] probabilities"
  assert score_sized("recompute") == []


def test_vlm_logits_equal_under_both_attention_implementations(setup):
  config, params, batches = setup
  b = batches[0]
  out = {}
  for impl in ("einsum", "xla", "folded"):
    c = config.model.unlock()
    c.attention = impl
    out[impl] = vlm.VLM(c).apply({"params": params}, b["image"], b["tokens"], b["input_mask"])
  np.testing.assert_allclose(out["xla"], out["einsum"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(out["folded"], out["einsum"], rtol=0, atol=1e-5)


def _fsdp_config(n, loss_chunk=0, batch=8):
  config = tiny.get_config()
  with config.unlocked():
    config.mesh.shape.update(data=1, fsdp=n, tensor=1)
    config.train.update(batch_size=batch, loss_chunk=loss_chunk)
  return config


def test_residual_stream_is_constrained_to_the_batch_axes():
  config = _fsdp_config(8)
  trainer = trainer_lib.build(config, _mesh((1, 8, 1)))
  text = trainer.step.lower(trainer_lib.abstract_state(trainer),
                            factory.abstract_batch(config, trainer.mesh)).as_text()
  d, f = config.model.llm.hidden_size, config.model.llm.intermediate_size
  b = config.train.batch_size
  batch_split = '[{"data", "fsdp"}, {}, {}]'
  residual = [l for l in text.splitlines()
              if "sdy.sharding_constraint" in l and batch_split in l and f"x{d}xf32>" in l
              and f"tensor<{b}x" in l]
  mlp = [l for l in text.splitlines()   # [batch, length, mlp]: mlp on 'tensor' (size 1)
         if "sdy.sharding_constraint" in l and '[{"data", "fsdp"}, {}, {"tensor"}]' in l
         and f"x{f}xf32>" in l]
  assert residual and mlp, "no [batch, length, embed] / [batch, length, mlp] constraints"
  # Without a mesh the constraints are no-ops (plain model.apply, one device).
  assert layers.constrain(jnp.ones((8, 3, d)), layers.ACT_EMBED).shape == (8, 3, d)


def test_fsdp8_chunked_step_equals_one_device_plain_step(setup):
  _, _, batches = setup
  one = _fsdp_config(1)
  eight = _fsdp_config(8, loss_chunk=16)
  results = []
  for config, mesh in ((one, _mesh((1, 1, 1))), (eight, _mesh((1, 8, 1)))):
    trainer = trainer_lib.build(config, mesh)
    state = trainer_lib.init_state(trainer, config)
    loss_values = []
    for b in batches[:1]:
      state, metrics = trainer.step(state, sharding.shard_batch(b, mesh))
      loss_values.append(float(metrics["loss"]))
    results.append((loss_values, traverse_util.flatten_dict(jax.device_get(state.params))))
  np.testing.assert_allclose(results[1][0], results[0][0], rtol=0, atol=1e-5)
  for key, want in results[0][1].items():
    np.testing.assert_allclose(results[1][1][key], want, rtol=0, atol=1e-5,
                               err_msg="/".join(key))


def test_step_temporaries_per_device_fall_with_the_mesh():
  temp = {}
  for n in (2, 8):
    config = _fsdp_config(n, loss_chunk=32, batch=32)
    with config.unlocked():
      config.data.max_len = 128
    trainer = trainer_lib.build(config, _mesh((1, n, 1)))
    compiled = trainer.step.lower(trainer_lib.abstract_state(trainer),
                                  factory.abstract_batch(config, trainer.mesh)).compile()
    temp[n] = compiled.memory_analysis().temp_size_in_bytes
  assert temp[8] < 0.5 * temp[2], temp
