"""KptLLM's train step: language loss on answer tokens + ``l1_weight`` x L1 of the
``<keypoint>`` regression (KptLLM Eq. 7, weight 2 in the paper), exact under gradient
accumulation.

Batch: the train-batch contract (``image, tokens, targets, loss_mask, input_mask``) plus
``support_image`` f32[B,S,H,W,3], ``support_xy`` f32[B,S,R,2] (normalized support-crop
units), ``support_mask`` f32[B,S,R], ``kpt_xy`` f32[B,R,2] (normalized query-crop units)
and ``kpt_mask`` f32[B,R] (1 where the row's r-th ``<keypoint>`` has a target).

    loss = sum(CE on answer tokens) / answer tokens
         + l1_weight * sum(|x - x̂| + |y - ŷ|) / keypoints

Both denominators are counted over the whole batch before the forward pass, so the k
micro-batches' gradients simply add up to the one-big-batch gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from kptjax.sharding import Rules
from kptjax.training import optim
from kptjax.training.step import Batch, TrainState, _micro_batches, lm_stats, model_context

KPT_BATCH_KEYS = ("support_image", "support_xy", "support_mask", "kpt_xy", "kpt_mask")


def l1_stats(pred: jax.Array, target: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
  """Masked L1 of keypoints, summed: pred/target f32[B,R,2], mask f32[B,R] ->
  {'l1_sum': sum over masked keypoints of |dx| + |dy|, 'keypoints': sum(mask)}."""
  mask = mask.astype(jnp.float32)
  err = jnp.sum(jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)
  return dict(l1_sum=jnp.sum(err * mask), keypoints=jnp.sum(mask))


def make_kpt_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    mask: Any,
    *,
    lr_schedule: optax.Schedule,
    rules: Rules,
    l1_weight: float = 2.0,
    grad_accum_steps: int = 1,
    seed: int = 0,
    loss_chunk: int = 0,
    mesh: jax.sharding.Mesh | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """Builds ``step(state, batch) -> (state, metrics)`` for ``kptjax.models.kptllm.KptLLM``.

  Arguments as ``train_step.make_train_step`` (the language loss is its ``lm_stats``),
  plus ``l1_weight``. Only the leaves where
  ``mask`` is True are differentiated and updated (LoRA, projector, prompt modules and
  keypoint head in 'lora+projector').

  Returns:
    The pure step. Metrics (f32 scalars): loss (the total above), lm_loss (CE per answer
    token), l1 (L1 per keypoint, normalized units), accuracy, lr, grad_norm (before
    clipping), answer_tokens, keypoints, input_tokens.
  """
  k = int(grad_accum_steps)

  def loss_fn(trainable, frozen, micro, key, denom_tok, denom_kpt):
    params = optim.merge(trainable, frozen)
    with model_context(rules, mesh):
      hidden, xy = model.apply(
          {"params": params}, micro["image"], micro["tokens"], micro["input_mask"],
          support_images=micro["support_image"], support_xy=micro["support_xy"],
          support_mask=micro["support_mask"], num_keypoint_slots=micro["kpt_xy"].shape[1],
          deterministic=False, rngs={"dropout": key}, return_hidden=True)
      stats = lm_stats(lambda h: model.apply({"params": params}, h, method="logits"),
                       hidden, micro["targets"], micro["loss_mask"], loss_chunk)
    stats.update(l1_stats(xy, micro["kpt_xy"], micro["kpt_mask"]))
    loss = stats["loss_sum"] / denom_tok + l1_weight * stats["l1_sum"] / denom_kpt
    return loss, stats

  grad_fn = jax.grad(loss_fn, has_aux=True)

  def step(state: TrainState, batch: Batch):
    trainable, frozen = optim.split(state.params, mask)
    key = jax.random.fold_in(jax.random.key(seed), state.step)
    denom_tok = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
    denom_kpt = jnp.maximum(jnp.sum(batch["kpt_mask"].astype(jnp.float32)), 1.0)
    if k == 1:
      grads, stats = grad_fn(trainable, frozen, batch, key, denom_tok, denom_kpt)
    else:
      def body(carry, inputs):
        i, micro = inputs
        g, s = grad_fn(trainable, frozen, micro, jax.random.fold_in(key, i), denom_tok,
                       denom_kpt)
        return jax.tree.map(jnp.add, carry, (g, s)), None
      zero = jnp.zeros((), jnp.float32)
      zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable),
               dict(loss_sum=zero, correct=zero, count=zero, l1_sum=zero, keypoints=zero))
      (grads, stats), _ = jax.lax.scan(body, zeros, (jnp.arange(k), _micro_batches(batch, k)))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, trainable)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    new_state = state.replace(step=state.step + 1, params=optim.merge(trainable, frozen),
                              opt_state=opt_state)
    lm_loss = stats["loss_sum"] / denom_tok
    l1 = stats["l1_sum"] / denom_kpt
    metrics = dict(
        loss=lm_loss + l1_weight * l1, lm_loss=lm_loss, l1=l1,
        accuracy=stats["correct"] / denom_tok,
        lr=jnp.asarray(lr_schedule(state.step), jnp.float32),
        grad_norm=optim.global_norm(grads),
        answer_tokens=stats["count"], keypoints=stats["keypoints"],
        input_tokens=jnp.sum(batch["input_mask"].astype(jnp.float32)),
    )
    return new_state, metrics

  return step
