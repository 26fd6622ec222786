"""The pure train step: token cross-entropy on answer tokens, exact gradient accumulation.

One step = one optimizer update on the global batch. With ``grad_accum_steps = k`` the
batch is split into k micro-batches; their summed token losses and gradients are divided
by the total answer-token count once, so the update equals the one-big-batch update.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from kptjax import optim
from kptjax.sharding import Rules

Params = dict[str, Any]
Batch = Mapping[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  """Everything a step changes. ``opt_state`` covers only the trainable subtree."""
  step: jax.Array                # i32[], optimizer updates applied so far
  params: Params                 # full param tree: trainable and frozen leaves
  opt_state: optax.OptState


def init_state(params: Params, tx: optax.GradientTransformation, mask: Params) -> TrainState:
  """A step-0 state; the optimizer state is built over the trainable leaves only."""
  trainable, _ = optim.split(params, mask)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(trainable))


def token_stats(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> dict[str, jax.Array]:
  """Masked next-token cross-entropy, summed (not averaged), in float32.

  Args:
    logits: f32/bf16[B, T, V].
    targets: i32[B, T], the next token at each position.
    loss_mask: f32[B, T], 1 on answer tokens (and their end-of-turn token).

  Returns:
    loss_sum: f32[], sum over masked positions of -log p(target).
    correct: f32[], masked positions whose argmax equals the target.
    count: f32[], sum of loss_mask.
  """
  logits = logits.astype(jnp.float32)
  mask = loss_mask.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  hit = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return dict(loss_sum=jnp.sum(ce * mask), correct=jnp.sum(hit * mask), count=jnp.sum(mask))


def _micro_batches(batch: Batch, k: int) -> Batch:
  """[B, ...] -> [k, B/k, ...]; micro-batch i holds rows i, i+k, i+2k, ...

  Strided rows keep every micro-batch spread over all data-parallel devices.
  """
  def one(x):
    b = x.shape[0]
    if b % k:
      raise ValueError(f"batch size {b} is not divisible by grad_accum_steps={k}")
    return jnp.swapaxes(x.reshape(b // k, k, *x.shape[1:]), 0, 1)
  return {name: one(x) for name, x in batch.items()}


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    mask: Params,
    *,
    lr_schedule: optax.Schedule,
    rules: Rules,
    grad_accum_steps: int = 1,
    seed: int = 0,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """Builds ``step(state, batch) -> (state, metrics)``; jit it with shardings outside.

  Args:
    model: the VLM; called as ``model.apply({'params': p}, image, tokens, input_mask,
      deterministic=False, rngs={'dropout': key})`` returning logits [B, T, V].
    tx: the optimizer over the trainable subtree.
    mask: bool tree shaped like the params (``optim.trainable_mask``).
    lr_schedule: step -> learning rate, reported in the metrics.
    rules: logical-axis rules, active while the model is traced.
    grad_accum_steps: k micro-batches per update.
    seed: dropout keys are ``fold_in(key(seed), step)``, so a resumed run draws the same.

  Returns:
    The pure step. Metrics (f32 scalars): loss (mean CE per answer token), accuracy
    (argmax hits per answer token), lr, grad_norm (before clipping), answer_tokens,
    input_tokens (non-padding tokens in the batch).
  """
  k = int(grad_accum_steps)

  def summed_loss(trainable, frozen, micro, key):
    params = optim.merge(trainable, frozen)
    with nn.logical_axis_rules(rules):
      logits = model.apply({"params": params}, micro["image"], micro["tokens"],
                           micro["input_mask"], deterministic=False, rngs={"dropout": key})
    stats = token_stats(logits, micro["targets"], micro["loss_mask"])
    return stats["loss_sum"], stats

  grad_fn = jax.grad(summed_loss, has_aux=True)

  def step(state: TrainState, batch: Batch):
    trainable, frozen = optim.split(state.params, mask)
    key = jax.random.fold_in(jax.random.key(seed), state.step)
    if k == 1:
      grads, stats = grad_fn(trainable, frozen, batch, key)
    else:
      def body(carry, inputs):
        i, micro = inputs
        g, s = grad_fn(trainable, frozen, micro, jax.random.fold_in(key, i))
        return jax.tree.map(jnp.add, carry, (g, s)), None
      zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable),
               dict(loss_sum=jnp.zeros(()), correct=jnp.zeros(()), count=jnp.zeros(())))
      (grads, stats), _ = jax.lax.scan(body, zeros, (jnp.arange(k), _micro_batches(batch, k)))
    denom = jnp.maximum(stats["count"], 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, trainable)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    new_state = state.replace(step=state.step + 1, params=optim.merge(trainable, frozen),
                              opt_state=opt_state)
    metrics = dict(
        loss=stats["loss_sum"] / denom,
        accuracy=stats["correct"] / denom,
        lr=jnp.asarray(lr_schedule(state.step), jnp.float32),
        grad_norm=optim.global_norm(grads),
        answer_tokens=stats["count"],
        input_tokens=jnp.sum(batch["input_mask"].astype(jnp.float32)),
    )
    return new_state, metrics

  return step
