"""layers.matmul, the dense projection of both towers: its value and both gradients equal
the plain einsum's (f32 1e-6, bf16 to its rounding), and its weight-gradient dot transposes
the smaller of the input and the output gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kptjax.models import layers


def _plain(x, w):
  return jnp.einsum("...i,io->...o", x, w)


def _loss(f, x, w, cot):
  return jnp.sum(f(x, w).astype(jnp.float32) * cot)


@pytest.mark.parametrize("x_shape,out", [((3, 7, 8), 24), ((3, 7, 24), 8), ((5, 16), 16),
                                         ((2, 3, 4, 6), 10)])
def test_value_and_gradients_equal_the_einsum(x_shape, out):
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=(x_shape[-1], out)), jnp.float32)
  cot = jnp.asarray(rng.normal(size=(*x_shape[:-1], out)), jnp.float32)
  np.testing.assert_allclose(layers.matmul(x, w), _plain(x, w), rtol=1e-6, atol=1e-6)
  got = jax.grad(lambda x, w: _loss(layers.matmul, x, w, cot), argnums=(0, 1))(x, w)
  want = jax.grad(lambda x, w: _loss(_plain, x, w, cot), argnums=(0, 1))(x, w)
  for g, r in zip(got, want):
    assert g.shape == r.shape and g.dtype == r.dtype
    np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-5)


def test_bf16_gradients_keep_the_dtype_and_match():
  rng = np.random.RandomState(1)
  x = jnp.asarray(rng.normal(size=(4, 9, 16)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(16, 32)), jnp.bfloat16)
  cot = jnp.asarray(rng.normal(size=(4, 9, 32)), jnp.float32)
  got = jax.grad(lambda x, w: _loss(layers.matmul, x, w, cot), argnums=(0, 1))(x, w)
  want = jax.grad(lambda x, w: _loss(_plain, x, w, cot), argnums=(0, 1))(x, w)
  for g, r in zip(got, want):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("inp,out", [(8, 24), (24, 8)])
def test_weight_gradient_transposes_the_smaller_operand(inp, out):
  """The dot contracting the token dims has the narrower of x [T, inp] / dy [T, out] as its
  lhs (XLA's CPU dot transposes its lhs there), so the wider one is read in place."""
  x = jnp.ones((5, 7, inp), jnp.float32)
  w = jnp.ones((inp, out), jnp.float32)
  jaxpr = jax.make_jaxpr(jax.grad(lambda w: jnp.sum(layers.matmul(x, w)), argnums=0))(w)
  dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"
          and e.params["dimension_numbers"][0] == ((0, 1), (0, 1))]
  assert len(dots) == 1
  assert dots[0].invars[0].aval.shape[-1] == min(inp, out)
