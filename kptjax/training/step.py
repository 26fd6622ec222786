"""The pure train step: token cross-entropy on answer tokens, exact gradient accumulation.

One step = one optimizer update on the global batch. With ``grad_accum_steps = k`` the
batch is split into k micro-batches; their summed token losses and gradients are divided
by the total answer-token count once, so the update equals the one-big-batch update.

The loss never holds the logits of the whole batch: the model returns its last hidden
states and ``lm_stats`` runs the output layer and the cross-entropy ``loss_chunk`` positions
at a time, recomputing each chunk's logits in the backward pass (the same value and
gradient as the plain loss; a 7B step at 1,024 tokens would otherwise hold f32[B,T,32000]).
Activations are laid out by the logical-axis rules on the step's mesh
(``kptjax.models.layers.constrain``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from kptjax.models import layers
from kptjax.sharding import Rules
from kptjax.training import optim

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


STAT_KEYS = ("loss_sum", "correct", "count")


def lm_stats(logits_fn: Callable[[jax.Array], jax.Array], hidden: jax.Array,
             targets: jax.Array, loss_mask: jax.Array, chunk: int = 0
             ) -> dict[str, jax.Array]:
  """``token_stats(logits_fn(hidden), ...)`` computed ``chunk`` positions at a time.

  Each chunk's logits f32[B,chunk,V] live only inside a rematerialized scan step, so
  neither the forward nor the backward pass holds f32[B,T,V]; the sums (and their
  gradients) equal the plain ones up to float summation order.

  Args:
    logits_fn: hidden [B,C,D] -> logits [B,C,V] (the model's final norm + output layer).
    hidden: [B,T,D], the last block's output.
    targets: i32[B,T]; loss_mask: f32[B,T].
    chunk: positions per chunk; 0 or >= T = one chunk (the plain loss). T is padded to a
      multiple with masked positions.

  Returns:
    As ``token_stats``.
  """
  b, t, d = hidden.shape
  if chunk <= 0 or chunk >= t:
    return token_stats(logits_fn(hidden), targets, loss_mask)
  n = -(-t // chunk)
  pad = n * chunk - t
  loss_mask = loss_mask.astype(jnp.float32)
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    loss_mask = jnp.pad(loss_mask, ((0, 0), (0, pad)))

  def chunks(x):   # [B, n*C, ...] -> [n, B, C, ...]
    return jnp.swapaxes(x.reshape(b, n, chunk, *x.shape[2:]), 0, 1)

  @jax.checkpoint
  def one(h, y, m):
    logits = layers.constrain(logits_fn(layers.constrain(h, layers.ACT_EMBED)),
                              ("batch", "length", "vocab"))
    return token_stats(logits, y, m)

  def body(carry, xs):
    return jax.tree.map(jnp.add, carry, one(*xs)), None

  zeros = {k: jnp.zeros((), jnp.float32) for k in STAT_KEYS}
  stats, _ = jax.lax.scan(body, zeros, (chunks(hidden), chunks(targets), chunks(loss_mask)))
  return stats


def model_context(rules: Rules, mesh: jax.sharding.Mesh | None) -> contextlib.ExitStack:
  """The logical-axis rules, and the mesh (when given) as the abstract mesh, for tracing
  the model inside the step: ``layers.constrain`` reads both."""
  stack = contextlib.ExitStack()
  stack.enter_context(nn.logical_axis_rules(rules))
  if mesh is not None:
    stack.enter_context(jax.sharding.use_abstract_mesh(mesh.abstract_mesh))
  return stack


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
    loss_chunk: int = 0,
    mesh: jax.sharding.Mesh | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """Builds ``step(state, batch) -> (state, metrics)``; jit it with shardings outside.

  Args:
    model: the VLM; called as ``model.apply({'params': p}, image, tokens, input_mask,
      deterministic=False, rngs={'dropout': key}, return_hidden=True)`` returning the
      last hidden states [B, T, D], and ``model.apply(..., hidden, method='logits')``.
    tx: the optimizer over the trainable subtree.
    mask: bool tree shaped like the params (``optim.trainable_mask``).
    lr_schedule: step -> learning rate, reported in the metrics.
    rules: logical-axis rules, active while the model is traced.
    grad_accum_steps: k micro-batches per update.
    seed: dropout keys are ``fold_in(key(seed), step)``, so a resumed run draws the same.
    loss_chunk: positions per chunk of the output layer + loss (``lm_stats``; 0 = all).
    mesh: the mesh the step runs on, for the activations' sharding constraints (None:
      the mesh active when the step is traced, if any).

  Returns:
    The pure step. Metrics (f32 scalars): loss (mean CE per answer token), accuracy
    (argmax hits per answer token), lr, grad_norm (before clipping), answer_tokens,
    input_tokens (non-padding tokens in the batch).
  """
  k = int(grad_accum_steps)

  def summed_loss(trainable, frozen, micro, key):
    params = optim.merge(trainable, frozen)
    with model_context(rules, mesh):
      hidden = model.apply({"params": params}, micro["image"], micro["tokens"],
                           micro["input_mask"], deterministic=False, rngs={"dropout": key},
                           return_hidden=True)
      stats = lm_stats(lambda h: model.apply({"params": params}, h, method="logits"),
                       hidden, micro["targets"], micro["loss_mask"], loss_chunk)
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
