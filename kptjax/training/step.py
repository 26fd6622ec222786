"""The one train step of every model variant: summed loss terms, exact gradient
accumulation, one optimizer update.

One step = one optimizer update on the global batch. The model variant
(``kptjax.models.factory.Variant``) runs the forward pass and names its loss terms
(``kptjax.training.losses``: the LM cross-entropy, and KptLLM's ``<keypoint>`` L1); each
term's denominator (answer tokens, keypoints) is counted over the whole batch before the
forward pass, so with ``grad_accum_steps = k`` the k micro-batches' gradients add up to
the one-big-batch update.

The loss never holds the logits of the whole batch: the model returns its last hidden
states and ``losses.lm_stats`` runs the output layer and the cross-entropy ``loss_chunk``
positions at a time over the answer positions only (chunks without an answer token are
skipped), recomputing each chunk's logits in the backward pass (the same value and
gradient as the plain loss; a 7B step at 1,024 tokens would otherwise hold
f32[B,T,32000]). Activations are laid out by the logical-axis rules on the step's mesh
(``kptjax.models.layers.constrain``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from kptjax.sharding import Rules
from kptjax.training import optim
from kptjax.training.losses import LossTerm

Params = dict[str, Any]
Batch = Mapping[str, jax.Array]
# (model, params, micro-batch, **apply kwargs) -> {'hidden': [B,T,D], ...}
ForwardFn = Callable[..., Mapping[str, jax.Array]]


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
    forward: ForwardFn,
    loss_terms: Sequence[LossTerm],
    lr_schedule: optax.Schedule,
    rules: Rules,
    grad_accum_steps: int = 1,
    seed: int = 0,
    loss_chunk: int = 0,
    mesh: jax.sharding.Mesh | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """Builds ``step(state, batch) -> (state, metrics)``; jit it with shardings outside.

  ``kptjax.models.factory.Variant`` gives ``model``, ``forward`` and ``loss_terms`` for a
  config (``kptjax.training.trainer.build`` wires them).

  Args:
    model: the Linen module; ``forward(model, params, micro, deterministic=False,
      rngs={'dropout': key})`` returns its outputs, at least ``'hidden'`` [B, T, D] (the
      last block's output), and ``model.apply(..., hidden, method='logits')`` the logits.
    tx: the optimizer over the trainable subtree.
    mask: bool tree shaped like the params (``optim.trainable_mask``); only these leaves
      are differentiated and updated.
    forward: the variant's forward pass (above).
    loss_terms: ``loss = sum(term.weight * sum(term stat) / term count)``.
    lr_schedule: step -> learning rate, reported in the metrics.
    rules: logical-axis rules, active while the model is traced.
    grad_accum_steps: k micro-batches per update (rows i, i+k, ... form micro-batch i).
    seed: dropout keys are ``fold_in(key(seed), step)``, so a resumed run draws the same.
    loss_chunk: positions per chunk of the output layer + loss (``lm_stats``; 0 = all).
    mesh: the mesh the step runs on, for the activations' sharding constraints (None:
      the mesh active when the step is traced, if any).

  Returns:
    The pure step. Metrics (f32 scalars): loss (the weighted sum), each term's mean under
    its name (lm_loss: CE per answer token; l1: L1 per keypoint), its count (answer_tokens,
    keypoints) and ratios (accuracy: argmax hits per answer token), lr, grad_norm (before
    clipping), input_tokens (non-padding tokens in the batch).
  """
  k = int(grad_accum_steps)
  terms = tuple(loss_terms)

  def loss_fn(trainable, frozen, micro, key, counts):
    params = optim.merge(trainable, frozen)
    stats = {}
    with model_context(rules, mesh):
      outputs = forward(model, params, micro, deterministic=False, rngs={"dropout": key})
      logits_fn = lambda h: model.apply({"params": params}, h, method="logits")
      for term in terms:
        stats.update(term.stats(outputs, micro, logits_fn, loss_chunk))
    loss = sum(t.weight * stats[t.sum_key] / counts[t.name] for t in terms)
    return loss, stats

  grad_fn = jax.grad(loss_fn, has_aux=True)

  def step(state: TrainState, batch: Batch):
    trainable, frozen = optim.split(state.params, mask)
    key = jax.random.fold_in(jax.random.key(seed), state.step)
    sums = {t.name: jnp.sum(batch[t.count_field].astype(jnp.float32)) for t in terms}
    counts = {name: jnp.maximum(n, 1.0) for name, n in sums.items()}
    if k == 1:
      grads, stats = grad_fn(trainable, frozen, batch, key, counts)
    else:
      micro = _micro_batches(batch, k)
      def body(carry, inputs):
        i, one = inputs
        out = grad_fn(trainable, frozen, one, jax.random.fold_in(key, i), counts)
        return jax.tree.map(jnp.add, carry, out), None
      shapes = jax.eval_shape(grad_fn, trainable, frozen, jax.tree.map(lambda x: x[0], micro),
                              key, counts)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)
      (grads, stats), _ = jax.lax.scan(body, zeros, (jnp.arange(k), micro))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, trainable)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    new_state = state.replace(step=state.step + 1, params=optim.merge(trainable, frozen),
                              opt_state=opt_state)
    metrics = {}
    for t in terms:
      metrics[t.name] = stats[t.sum_key] / counts[t.name]
      metrics[t.count_name] = sums[t.name]
      metrics.update({name: stats[stat] / counts[t.name] for name, stat in t.ratios})
    metrics.update(
        loss=sum(t.weight * metrics[t.name] for t in terms),
        lr=jnp.asarray(lr_schedule(state.step), jnp.float32),
        grad_norm=optim.global_norm(grads),
        input_tokens=jnp.sum(batch["input_mask"].astype(jnp.float32)),
    )
    return new_state, metrics

  return step
