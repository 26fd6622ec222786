"""CLIP vision conversion: kptjax ViT equals transformers' torch CLIPVisionModel.

Reference: a tiny random CLIPVisionModel (weights perturbed so biases and norms are not at
their trivial init), saved with save_pretrained, loaded with load_clip_vision. LLaVA's
features are ``hidden_states[-2]`` without the class token and without post_layernorm:
kptjax's patch tokens at ``feature_layer=-2``. Tolerance 1e-4 in float32.
"""

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from kptjax import convert
from kptjax.convert.clip import load_clip_vision
from kptjax.errors import CheckpointError
from kptjax.models.vit import ViT

TOL = 1e-4
HF_KW = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             image_size=28, patch_size=14, hidden_act="quick_gelu")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  torch.manual_seed(0)
  model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**HF_KW))
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  model.eval()
  path = tmp_path_factory.mktemp("clip")
  model.save_pretrained(path)
  return model, path


def _hf_hidden(model, images, **kw):
  with torch.no_grad():
    return model(torch.from_numpy(images).permute(0, 3, 1, 2), output_hidden_states=True,
                 **kw).hidden_states


def _apply(config, params, images, **kw):
  return np.asarray(jax.jit(lambda p, x: ViT(config).apply({"params": p}, x, **kw))(
      params, images))


def _images(side):
  return np.random.default_rng(0).normal(size=(2, side, side, 3)).astype(np.float32)


def test_clip_config(clip):
  _, path = clip
  config, params = load_clip_vision(path)
  assert (config.image_size, config.patch_size, config.hidden_size) == (28, 14, 32)
  assert config.hidden_act == "quick_gelu" and config.pre_layernorm
  assert not (config.layerscale or config.final_layernorm or config.patch_bias)
  assert set(params) == {"embeddings", "pre_norm", "layers"}
  assert "layer_scale1" not in params["layers"] and "patch_bias" not in params["embeddings"]


def test_clip_penultimate_layer_parity(clip):
  """LLaVA's feature: hidden_states[-2][:, 1:] == kptjax patch tokens at feature_layer=-2."""
  model, path = clip
  config, params = load_clip_vision(path)
  config.feature_layer = -2
  images = _images(28)
  hidden = _hf_hidden(model, images)
  assert len(hidden) == 1 + config.num_layers
  out = _apply(config, params, images)
  assert out.shape == (2, 4, 32)
  np.testing.assert_allclose(out, hidden[-2][:, 1:].numpy(), atol=TOL, rtol=0)
  # Last block with every token: last_hidden_state (no post_layernorm).
  config.feature_layer = -1
  np.testing.assert_allclose(_apply(config, params, images, return_all=True),
                             hidden[-1].numpy(), atol=TOL, rtol=0)


def test_clip_interpolated_position_embeddings(clip):
  """image_size 42 (3x3 grid) from a 28-pixel (2x2) checkpoint: CLIP's
  interpolate_pos_encoding=True (bicubic, no antialias)."""
  model, path = clip
  config, params = load_clip_vision(path, image_size=42)
  assert config.pretrained_image_size == 28 and not config.interpolate_antialias
  config.feature_layer = -2
  images = _images(42)
  ref = _hf_hidden(model, images, interpolate_pos_encoding=True)[-2][:, 1:].numpy()
  np.testing.assert_allclose(_apply(config, params, images), ref, atol=TOL, rtol=0)


def test_full_clip_model_and_dispatch(tmp_path):
  """A CLIPModel dir (model_type 'clip', text tower alongside): its vision_config and
  vision_model.* tensors are used; convert.load_vit (what load_vlm and the CLI call for
  checkpoints.vit_dir) picks the CLIP converter by model_type. (load_vlm itself is
  covered with DINOv2 in test_vlm.py; building a whole VLM here would cost ~8 s.)"""
  torch.manual_seed(0)
  hf_config = transformers.CLIPConfig(
      vision_config=HF_KW, text_config=dict(hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=2,
                                            vocab_size=64), projection_dim=8)
  model = transformers.CLIPModel(hf_config).eval()
  model.save_pretrained(tmp_path)
  vc, params = convert.load_vit(tmp_path)
  assert (vc.hidden_size, vc.num_layers, vc.patch_size) == (32, 2, 14)
  assert vc.pre_layernorm and not (vc.layerscale or vc.final_layernorm or vc.patch_bias)
  _, bf16 = convert.load_vit(tmp_path, param_dtype="bfloat16")
  assert bf16["layers"]["attention"]["query"]["kernel"].dtype == jax.numpy.bfloat16
  vc.feature_layer = -2
  images = _images(28)
  with torch.no_grad():
    ref = model.vision_model(torch.from_numpy(images).permute(0, 3, 1, 2),
                             output_hidden_states=True).hidden_states[-2][:, 1:].numpy()
  np.testing.assert_allclose(_apply(vc, params, images), ref, atol=TOL, rtol=0)


def test_wrong_shape_and_missing_tensor(clip, tmp_path):
  _, path = clip
  # As the hub's CLIPModel dirs name them (transformers v5 saves them unprefixed).
  tensors = {("" if k.startswith("vision_model.") else "vision_model.") + k: v
             for k, v in load_file(path / "model.safetensors").items()}
  save_file(tensors, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_bytes((path / "config.json").read_bytes())
  load_clip_vision(tmp_path)       # the prefixed names load
  name = "vision_model.encoder.layers.1.self_attn.k_proj.weight"
  bad = dict(tensors, **{name: np.zeros((32, 31), np.float32)})
  save_file(bad, str(tmp_path / "model.safetensors"))
  with pytest.raises(CheckpointError, match=r"k_proj\.weight.*\(32, 31\).*\(32, 32\)"):
    load_clip_vision(tmp_path)
  missing = {k: v for k, v in tensors.items() if "pre_layrnorm.weight" not in k}
  save_file(missing, str(tmp_path / "model.safetensors"))
  with pytest.raises(CheckpointError, match=r"'vision_model\.pre_layrnorm\.weight' missing"):
    load_clip_vision(tmp_path)
  missing = {k: v for k, v in tensors.items() if k != name}
  save_file(missing, str(tmp_path / "model.safetensors"))
  with pytest.raises(CheckpointError, match=r"layers\.1\.self_attn\.k_proj\.weight' missing"):
    load_clip_vision(tmp_path)


def test_not_clip_rejected(tmp_path):
  (tmp_path / "config.json").write_text('{"model_type": "vit"}')
  with pytest.raises(CheckpointError, match="model_type='vit'"):
    load_clip_vision(tmp_path)
