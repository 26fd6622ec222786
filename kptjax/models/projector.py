"""Vision -> language projector: patch features [B,P,Dv] -> image tokens [B,P,D].

kinds:
  'linear'      one Dense (LocLLM: Linear(1024 -> 4096)).
  'mlp2x_gelu'  Dense, GELU (exact erf, torch nn.GELU's default), Dense (PoseLLM, LLaVA-1.5).

Params: ``fc1/{kernel [Dv,D], bias [D]}`` and for 'mlp2x_gelu' also ``fc2/{kernel [D,D],
bias [D]}``. Logical axes: fc1 ('vit_embed', 'embed') for 'linear', ('vit_embed', 'mlp')
for the MLP's first layer and ('mlp', 'embed') for its second, so no array names the same
mesh axis twice. The weights are LLaVA's ``mm_projector`` (linear) / ``mm_projector.0``
and ``mm_projector.2`` (mlp2x_gelu) with the torch [out, in] weights transposed.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from kptjax.errors import ConfigError
from kptjax.models.layers import DType, default_kernel_init, logical_init

Array = jax.Array

KINDS = ("linear", "mlp2x_gelu")


class Projector(nn.Module):
  """Maps vision features to the LLM's embedding width.

  Attributes:
    kind: 'linear' | 'mlp2x_gelu'.
    out_features: the LLM hidden size D.
    dtype: compute dtype; param_dtype: storage dtype.
  """
  kind: str
  out_features: int
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  def _dense(self, axes: tuple[str, str], name: str) -> nn.Dense:
    return nn.Dense(self.out_features, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=logical_init(default_kernel_init, axes),
                    bias_init=logical_init(nn.initializers.zeros, (axes[1],)), name=name)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x [B,P,Dv] (any float dtype) -> [B,P,out_features] in ``dtype``."""
    if self.kind == "linear":
      return self._dense(("vit_embed", "embed"), "fc1")(x)
    if self.kind == "mlp2x_gelu":
      h = self._dense(("vit_embed", "mlp"), "fc1")(x)
      h = nn.gelu(h, approximate=False)
      return self._dense(("mlp", "embed"), "fc2")(h)
    raise ConfigError(f"model.projector.kind={self.kind!r} (expected one of {KINDS})")
