"""ViT and DINOv2 conversion: kptjax equals transformers' torch Dinov2 models.

Reference: tiny random Dinov2Model / Dinov2WithRegistersModel (weights perturbed so biases,
LayerScale and norms are not at their trivial init), saved with save_pretrained, loaded with
load_dinov2. Their image_size (56) is larger than the test input (32), so the position
embeddings are resized (7x7 -> 4x4 grid). Tolerance 1e-4 in float32 (the issue's bound).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from configs import common
from kptjax.convert.dinov2 import load_dinov2, vit_config_from_hf
from kptjax.errors import CheckpointError, ConfigError
from kptjax.models import vit as vit_lib
from kptjax.models.vit import ViT

TOL = 1e-4
HF_KW = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4,
             image_size=56, patch_size=8, layerscale_value=0.5)


def _perturbed(model):
  torch.manual_seed(1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  return model.eval()


def _save(model, path):
  model.save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def images():
  return np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory):
  torch.manual_seed(0)
  model = _perturbed(transformers.Dinov2Model(transformers.Dinov2Config(**HF_KW)))
  return model, _save(model, tmp_path_factory.mktemp("dinov2"))


@pytest.fixture(scope="module")
def dinov2_registers(tmp_path_factory):
  torch.manual_seed(0)
  config = transformers.Dinov2WithRegistersConfig(num_register_tokens=3, **HF_KW)
  model = _perturbed(transformers.Dinov2WithRegistersModel(config))
  return model, _save(model, tmp_path_factory.mktemp("dinov2_reg"))


def _hf(model, images, **kw):
  with torch.no_grad():
    return model(torch.from_numpy(images).permute(0, 3, 1, 2), **kw)


def _apply(config, params, images, **kw):
  return np.asarray(jax.jit(lambda p, x: ViT(config).apply({"params": p}, x, **kw))(
      params, images))


# ----------------------------------------------------------------------------- bicubic
@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("in_size,out_size", [(37, 16), (7, 4), (4, 7), (5, 3), (6, 6)])
def test_bicubic_matches_torch_interpolate(antialias, in_size, out_size):
  grid = np.random.default_rng(0).normal(size=(in_size, in_size, 3)).astype(np.float32)
  ref = torch.nn.functional.interpolate(
      torch.from_numpy(grid).permute(2, 0, 1)[None], size=(out_size, out_size),
      mode="bicubic", align_corners=False, antialias=antialias)[0].permute(1, 2, 0).numpy()
  out = np.asarray(vit_lib.resize_bicubic(jnp.asarray(grid), (out_size, out_size), antialias))
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ parity
def test_dinov2_parity(dinov2, images):
  model, path = dinov2
  config, params = load_dinov2(path, image_size=32)
  assert config.pretrained_image_size == 56 and not config.interpolate_antialias
  ref = _hf(model, images).last_hidden_state.numpy()
  out = _apply(config, params, images, return_all=True)
  assert out.shape == ref.shape == (2, 1 + 16, 32)
  np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)
  patches = _apply(config, params, images)       # what the projector sees
  assert patches.dtype == np.float32
  np.testing.assert_allclose(patches, ref[:, 1:], atol=TOL, rtol=0)


def test_dinov2_with_registers_parity(dinov2_registers, images):
  model, path = dinov2_registers
  config, params = load_dinov2(path, image_size=32)
  assert config.num_register_tokens == 3 and config.interpolate_antialias
  ref = _hf(model, images).last_hidden_state.numpy()
  out = _apply(config, params, images, return_all=True)
  assert out.shape == ref.shape == (2, 1 + 3 + 16, 32)
  np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)
  np.testing.assert_allclose(out[:, 4:], ref[:, 4:], atol=TOL, rtol=0)


def test_feature_layer_is_normalized_block_output(dinov2, images):
  model, path = dinov2
  config, params = load_dinov2(path, image_size=32)
  with config.unlocked():
    config.feature_layer = 0            # output of the first of two blocks
  hf = _hf(model, images, output_hidden_states=True)
  with torch.no_grad():
    ref = model.layernorm(hf.hidden_states[1])[:, 1:].numpy()
  np.testing.assert_allclose(_apply(config, params, images), ref, atol=TOL, rtol=0)


def test_swiglu_with_v5_tensor_names_and_prefix(tmp_path, images):
  """DINOv2-giant style SwiGLU FFN; tensors renamed to transformers v5's q_proj/o_proj/
  gate_proj/up_proj layout under a 'dinov2.' prefix (an image-classification checkpoint)."""
  torch.manual_seed(0)
  model = _perturbed(transformers.Dinov2Model(transformers.Dinov2Config(
      use_swiglu_ffn=True, **HF_KW)))
  _save(model, tmp_path)
  tensors = load_file(tmp_path / "model.safetensors")
  assert any("weights_in" in k for k in tensors)    # the hub's fused layout
  renamed = {}
  for name, t in tensors.items():
    for old, new in (("attention.attention.query", "attention.q_proj"),
                     ("attention.attention.key", "attention.k_proj"),
                     ("attention.attention.value", "attention.v_proj"),
                     ("attention.output.dense", "attention.o_proj"),
                     ("mlp.weights_out", "mlp.down_proj")):
      name = name.replace(old, new)
    if "mlp.weights_in" in name:
      gate, up = np.split(t, 2, axis=0)
      renamed["dinov2." + name.replace("weights_in", "gate_proj")] = gate
      renamed["dinov2." + name.replace("weights_in", "up_proj")] = up
    else:
      renamed["dinov2." + name] = t
  renamed["classifier.weight"] = np.zeros((3, 64), np.float32)   # ignored
  save_file(renamed, tmp_path / "model.safetensors")
  config, params = load_dinov2(tmp_path, image_size=32)
  assert config.use_swiglu_ffn and config.intermediate_size == 88   # (int(128*2/3)+7)//8*8
  ref = _hf(model, images).last_hidden_state.numpy()
  np.testing.assert_allclose(_apply(config, params, images, return_all=True), ref,
                             atol=TOL, rtol=0)


# ------------------------------------------------------------------- conversion details
def test_vit_config_from_hf_has_the_config_fields():
  hf = transformers.Dinov2Config(**HF_KW).to_dict()
  ours = vit_config_from_hf(hf, image_size=224)
  reference = common.vit_config(image_size=224, patch_size=8, hidden_size=32, num_layers=2,
                                num_heads=4, intermediate_size=128, pretrained_image_size=56)
  assert set(ours.keys()) == set(reference.keys())
  assert ours.to_dict() == {**reference.to_dict(), "layerscale_value": 0.5}


def test_bf16_checkpoint_stays_bf16(tmp_path):
  torch.manual_seed(0)
  model = transformers.Dinov2Model(transformers.Dinov2Config(**HF_KW)).to(torch.bfloat16)
  _save(model, tmp_path)
  _, params = load_dinov2(tmp_path)
  dtypes = {str(x.dtype) for x in jax.tree_util.tree_leaves(params)}
  assert dtypes == {"bfloat16"}
  ref = model.encoder.layer[1].attention.q_proj.weight.detach().float().numpy().T
  np.testing.assert_array_equal(params["layers"]["attention"]["query"]["kernel"][1]
                                .astype(np.float32), ref)
  _, params32 = load_dinov2(tmp_path, param_dtype="float32")
  assert {str(x.dtype) for x in jax.tree_util.tree_leaves(params32)} == {"float32"}


def test_missing_tensor_is_named(dinov2, tmp_path):
  _, path = dinov2
  tensors = load_file(path / "model.safetensors")
  del tensors["encoder.layer.1.attention.attention.value.weight"]
  save_file(tensors, tmp_path / "model.safetensors")
  (tmp_path / "config.json").write_text((path / "config.json").read_text())
  with pytest.raises(CheckpointError, match=r"encoder\.layer\.1\.attention\.attention\.value"
                     r"\.weight.*missing"):
    load_dinov2(tmp_path)


def test_wrong_shape_is_named(dinov2, tmp_path):
  _, path = dinov2
  tensors = load_file(path / "model.safetensors")
  tensors["encoder.layer.0.mlp.fc1.weight"] = np.zeros((100, 32), np.float32)
  save_file(tensors, tmp_path / "model.safetensors")
  (tmp_path / "config.json").write_text((path / "config.json").read_text())
  with pytest.raises(CheckpointError) as e:
    load_dinov2(tmp_path)
  msg = str(e.value)
  assert "encoder.layer.0.mlp.fc1.weight" in msg and "(100, 32)" in msg and "(128, 32)" in msg


# ------------------------------------------------------------------------ model options
def _tiny_config(**overrides):
  c = common.vit_config(image_size=32, patch_size=8, hidden_size=32, num_layers=2,
                        num_heads=2, intermediate_size=64, pretrained_image_size=48)
  c.update(overrides)
  return c


def _strip_lora(tree):
  if isinstance(tree, dict):
    return {k: _strip_lora(v) for k, v in tree.items() if k not in ("lora_a", "lora_b")}
  return tree


def test_lora_zero_b_leaves_output_unchanged(images):
  config = _tiny_config()
  lora = ml_collections.ConfigDict(dict(rank=4, alpha=8.0, dropout=0.0,
                                        vit_targets=["query", "value"]))
  params = nn.meta.unbox(jax.jit(ViT(config, lora=lora).init)(jax.random.key(0), images)["params"])
  attn = params["layers"]["attention"]
  assert set(attn["query"]) == {"kernel", "bias", "lora_a", "lora_b"}
  assert attn["query"]["lora_a"].shape == (2, 32, 4)       # stacked over 2 layers
  assert "lora_a" not in attn["key"] and "lora_a" not in params["layers"]["mlp"]["fc1"]

  apply_lora = jax.jit(lambda p: ViT(config, lora=lora).apply({"params": p}, images))
  base = _apply(config, _strip_lora(params), images)
  # Equal up to XLA's float reassociation between the two compiled programs.
  np.testing.assert_allclose(np.asarray(apply_lora(params)), base, atol=1e-5, rtol=0)
  # The adapter is live: a non-zero B moves the output.
  attn["value"]["lora_b"] = jnp.full_like(attn["value"]["lora_b"], 0.1)
  assert np.abs(np.asarray(apply_lora(params)) - base).max() > 1e-3


def test_unknown_lora_target_is_a_config_error(images):
  lora = ml_collections.ConfigDict(dict(rank=2, alpha=4.0, dropout=0.0, vit_targets=["q_proj"]))
  with pytest.raises(ConfigError, match="q_proj"):
    jax.eval_shape(lambda: ViT(_tiny_config(), lora=lora).init(jax.random.key(0), images))


def test_params_carry_logical_axes(images):
  config = _tiny_config(num_register_tokens=2)
  lora = ml_collections.ConfigDict(dict(rank=2, alpha=4.0, dropout=0.0, vit_targets=["query"]))
  boxed = jax.eval_shape(lambda: ViT(config, lora=lora).init(jax.random.key(0), images))
  leaves = jax.tree_util.tree_leaves_with_path(
      boxed["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert len(leaves) > 20
  for path, leaf in leaves:
    name = jax.tree_util.keystr(path)
    assert isinstance(leaf, nn.LogicallyPartitioned), name
    assert len(leaf.names) == leaf.value.ndim, name
    assert (leaf.names[0] == "layers") == ("['layers']" in name), name
  rules = [tuple(r) for r in common.LOGICAL_AXIS_RULES]
  specs = nn.get_partition_spec(boxed["params"])
  jax.tree_util.tree_map(lambda s: nn.logical_to_mesh_axes(s, rules), specs,
                         is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  q = boxed["params"]["layers"]["attention"]["query"]
  assert q["kernel"].names == ("layers", "vit_embed", "heads")
  assert q["lora_a"].names == ("layers", "vit_embed", "lora_rank")


def test_sincos_remat_gradients():
  """From-scratch variant: fixed 2D sin-cos positions (no param), a non-square input,
  remat under scan; gradients reach every param."""
  config = _tiny_config(pos_embed="sincos2d")
  model = ViT(config, remat_policy="nothing_saveable")
  x = np.random.default_rng(1).normal(size=(1, 16, 24, 3)).astype(np.float32)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), x)["params"])
  assert "pos_embed" not in params["embeddings"]
  def loss(p):
    feats = model.apply({"params": p}, x)
    return jnp.sum(feats ** 2), feats
  (value, feats), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  assert feats.shape == (1, 2 * 3, 32) and np.isfinite(float(value))
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.abs(np.asarray(g)).max() > 0, jax.tree_util.keystr(path)
