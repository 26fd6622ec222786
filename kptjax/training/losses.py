"""The loss terms of the one train step (``kptjax.training.step``), as summed statistics.

A term is ``weight * sum(per-item loss) / count``: the step sums ``stats[sum_key]`` over
the micro-batches and divides by ``count = max(sum(batch[count_field]), 1)``, counted over
the whole batch before the forward pass, so k micro-batches' gradients add up to the
one-big-batch gradient. The model variant (``kptjax.models.factory.variant_of``) says which
terms a config trains:

* ``LM_TERM``: cross-entropy on answer tokens (every variant); metrics ``lm_loss``,
  ``accuracy`` (argmax hits per answer token) and ``answer_tokens``.
* ``l1_term(w)``: KptLLM's L1 of the ``<keypoint>`` regression in normalized query-crop
  units (KptLLM Eq. 7, weight 2 in the paper); metrics ``l1`` and ``keypoints``.

    loss = sum(CE on answer tokens) / answer tokens
         + l1_weight * sum(|x - x̂| + |y - ŷ|) / keypoints
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from kptjax.models import layers

Batch = Mapping[str, jax.Array]
# (model outputs {'hidden': [B,T,D], ...}, micro-batch, logits_fn, loss_chunk) -> summed stats
StatsFn = Callable[[Mapping[str, jax.Array], Batch, Callable[[jax.Array], jax.Array], int],
                   dict[str, jax.Array]]


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
  """``token_stats(logits_fn(hidden), ...)`` computed ``chunk`` positions at a time, over
  the answer positions only.

  Each row's answer positions are moved to its front (a stable sort of the mask), so
  the chunks past the longest row's answers hold no answer token; those chunks are
  skipped (``lax.cond``): no vocabulary logits for image, prompt or padding tokens, in
  the forward or the backward pass. Each computed chunk's logits f32[B,chunk,V] live
  only inside a rematerialized scan step, so neither pass holds f32[B,T,V]. The sums
  (and their gradients) equal the plain ones up to float summation order.

  Args:
    logits_fn: hidden [B,C,D] -> logits [B,C,V] (the model's final norm + output layer).
    hidden: [B,T,D], the last block's output.
    targets: i32[B,T]; loss_mask: f32[B,T] (0 where no loss is taken).
    chunk: positions per chunk; 0 or >= T = one chunk (the plain loss over every
      position). T is padded to a multiple with masked positions.

  Returns:
    As ``token_stats``.
  """
  b, t, d = hidden.shape
  if chunk <= 0 or chunk >= t:
    return token_stats(logits_fn(hidden), targets, loss_mask)
  loss_mask = loss_mask.astype(jnp.float32)
  order = jnp.argsort(loss_mask == 0, axis=1, stable=True)      # answers first
  hidden = jnp.take_along_axis(hidden, order[..., None], axis=1)
  targets = jnp.take_along_axis(targets, order, axis=1)
  loss_mask = jnp.take_along_axis(loss_mask, order, axis=1)
  n = -(-t // chunk)
  pad = n * chunk - t
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    loss_mask = jnp.pad(loss_mask, ((0, 0), (0, pad)))

  def chunks(x):   # [B, n*C, ...] -> [n, B, C, ...]
    return jnp.swapaxes(x.reshape(b, n, chunk, *x.shape[2:]), 0, 1)

  zeros = {k: jnp.zeros((), jnp.float32) for k in STAT_KEYS}

  @jax.checkpoint
  def one(h, y, m):
    logits = layers.constrain(logits_fn(layers.constrain(h, layers.ACT_EMBED)),
                              ("batch", "length", "vocab"))
    return token_stats(logits, y, m)

  def body(carry, xs):
    stats = jax.lax.cond(jnp.any(xs[2] != 0), one, lambda *_: zeros, *xs)
    return jax.tree.map(jnp.add, carry, stats), None

  stats, _ = jax.lax.scan(body, zeros, (chunks(hidden), chunks(targets), chunks(loss_mask)))
  return stats


def l1_stats(pred: jax.Array, target: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
  """Masked L1 of keypoints, summed: pred/target f32[B,R,2], mask f32[B,R] ->
  {'l1_sum': sum over masked keypoints of |dx| + |dy|, 'keypoints': sum(mask)}."""
  mask = mask.astype(jnp.float32)
  err = jnp.sum(jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)
  return dict(l1_sum=jnp.sum(err * mask), keypoints=jnp.sum(mask))


@dataclasses.dataclass(frozen=True)
class LossTerm:
  """One term of the loss: ``weight * stats[sum_key] / max(sum(batch[count_field]), 1)``.

  Attributes:
    name: metric of the term's mean (e.g. 'lm_loss', 'l1').
    weight: its factor in ``loss``.
    stats: ``(outputs, micro, logits_fn, loss_chunk) -> {stat: f32[]}``, summed over the
      micro-batch; must hold ``sum_key`` and the ``ratios``' stats.
    sum_key: the stat whose sum the term is.
    count_field: batch field f32/bool[B, ...] whose sum over the batch is the denominator.
    count_name: metric of that sum (e.g. 'answer_tokens').
    ratios: (metric, stat) pairs reported as ``stat / count`` (e.g. accuracy).
  """
  name: str
  weight: float
  stats: StatsFn
  sum_key: str
  count_field: str
  count_name: str
  ratios: tuple[tuple[str, str], ...] = ()


def _lm_term_stats(outputs, micro, logits_fn, loss_chunk):
  return lm_stats(logits_fn, outputs["hidden"], micro["targets"], micro["loss_mask"],
                  loss_chunk)


def _l1_term_stats(outputs, micro, logits_fn, loss_chunk):
  del logits_fn, loss_chunk
  return l1_stats(outputs["xy"], micro["kpt_xy"], micro["kpt_mask"])


LM_TERM = LossTerm(name="lm_loss", weight=1.0, stats=_lm_term_stats, sum_key="loss_sum",
                   count_field="loss_mask", count_name="answer_tokens",
                   ratios=(("accuracy", "correct"),))


def l1_term(weight: float) -> LossTerm:
  """KptLLM's ``<keypoint>`` regression: ``weight`` x L1 per keypoint (model output 'xy'
  f32[B,R,2] against ``kpt_xy`` where ``kpt_mask``)."""
  return LossTerm(name="l1", weight=float(weight), stats=_l1_term_stats, sum_key="l1_sum",
                  count_field="kpt_mask", count_name="keypoints")
