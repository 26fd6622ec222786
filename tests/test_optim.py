"""Optimizer contracts (configs/tiny.py:lora): the schedule warms up linearly and decays
by cosine (or warmup-stable-decay) to end_lr_ratio * lr; the trainable split and merge
round-trip. The train step's contracts are tests/test_train_step.py."""

import jax
import numpy as np
import pytest
from flax import traverse_util

from configs import tiny
from kptjax.training import optim


def _optim(**overrides):
  """The optim section of configs/tiny.py:lora with ``overrides``."""
  config = tiny.get_config("lora").unlock()
  config.optim.update(overrides)
  return config.optim


def test_schedule_warmup_then_cosine():
  fn = optim.schedule(_optim(lr=1e-3, warmup_ratio=0.1, end_lr_ratio=0.1), 100)
  lrs = np.array([float(fn(s)) for s in range(101)])
  np.testing.assert_allclose(lrs[:11], np.linspace(0, 1e-3, 11), rtol=1e-5, atol=1e-9)
  assert np.all(np.diff(lrs[10:]) < 0)
  assert lrs[55] == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-4)   # half-way down the cosine
  assert lrs[100] == pytest.approx(1e-4, rel=1e-4)


def test_schedule_warmup_stable_decay():
  fn = optim.schedule(_optim(lr=1e-3, warmup_ratio=0.1, end_lr_ratio=0.0, schedule="wsd",
                            decay_ratio=0.2), 100)
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
