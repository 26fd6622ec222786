"""Projector: shapes, logical axes, and equality with the torch modules LocLLM / PoseLLM use."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from kptjax.errors import ConfigError
from kptjax.models.projector import Projector

VIT_D, LLM_D = 24, 40


@pytest.fixture(scope="module")
def features():
  return np.random.default_rng(0).normal(size=(2, 5, VIT_D)).astype(np.float32)


def _init(kind, features):
  boxed = Projector(kind, LLM_D).init(jax.random.key(0), features)["params"]
  return boxed, nn.meta.unbox(boxed)


def _to_torch(linear: torch.nn.Linear, params):
  with torch.no_grad():
    linear.weight.copy_(torch.tensor(np.asarray(params["kernel"]).T))
    linear.bias.copy_(torch.tensor(np.asarray(params["bias"])))


@pytest.mark.parametrize("kind", ["linear", "mlp2x_gelu"])
def test_equals_torch_reference(kind, features):
  """linear = LocLLM's nn.Linear; mlp2x_gelu = LLaVA-1.5's Sequential(Linear, GELU, Linear)."""
  _, params = _init(kind, features)
  # Non-zero biases so the test sees them (they init to zero).
  params = jax.tree_util.tree_map(lambda x: x + 0.1 if x.ndim == 1 else x, params)
  out = np.asarray(Projector(kind, LLM_D).apply({"params": params}, features))
  assert out.shape == (2, 5, LLM_D) and out.dtype == np.float32
  if kind == "linear":
    ref = torch.nn.Linear(VIT_D, LLM_D)
    _to_torch(ref, params["fc1"])
    assert set(params) == {"fc1"}
  else:
    ref = torch.nn.Sequential(torch.nn.Linear(VIT_D, LLM_D), torch.nn.GELU(),
                              torch.nn.Linear(LLM_D, LLM_D))
    _to_torch(ref[0], params["fc1"])
    _to_torch(ref[2], params["fc2"])
  with torch.no_grad():
    expected = ref(torch.from_numpy(features)).numpy()
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)


def test_logical_axes_and_bf16_compute(features):
  boxed, params = _init("mlp2x_gelu", features)
  assert boxed["fc1"]["kernel"].names == ("vit_embed", "mlp")
  assert boxed["fc2"]["kernel"].names == ("mlp", "embed")
  assert _init("linear", features)[0]["fc1"]["kernel"].names == ("vit_embed", "embed")
  out = Projector("mlp2x_gelu", LLM_D, dtype=jnp.bfloat16).apply({"params": params}, features)
  assert out.dtype == jnp.bfloat16


def test_unknown_kind_is_a_config_error(features):
  with pytest.raises(ConfigError, match="mlp3x"):
    Projector("mlp3x", LLM_D).init(jax.random.key(0), features)
