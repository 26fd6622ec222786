"""Runs that refuse the wrong thing, before anything heavy is read, compiled or written.

Each case is one a new user meets (issue "Runs that refuse the wrong thing"); each used to
run on, or fail late with an unnamed error:

* a GPT-2 dir as ``checkpoints.llm_dir`` (was ``KeyError: 'num_attention_heads'``) and a
  DINOv2 dir as ``llm_dir`` (was ``hidden_act='gelu'``, no dir named): a CheckpointError
  naming the dir, the type found and the supported ones, before any tensor is read;
* a Qwen2 checkpoint (refused by its model_type) and the same tensors labelled 'llama'
  (was: trained with its q/k/v biases dropped): the dropped tensors are listed;
* a Llama with a 256-row embedding table under the 512-id tiny tokenizer (was: NaN loss
  at step 1, "lower optim.lr"): a ConfigError before the step is built or the workdir made;
* a placeholder id that is also the end-of-sequence id, a crop that is not a whole
  number of patches: named by their fields.

Reference models are tiny random transformers models saved with save_pretrained.
"""

import json
import time

import numpy as np
import pytest
import torch
import transformers

from configs import tiny
from kptjax import convert
from kptjax.convert import hf_io
from kptjax.data import tokenizer
from kptjax.errors import CheckpointError, ConfigError
from kptjax.training import preflight, trainer as trainer_lib

SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=128)


def _config(llm_dir="", vit_dir=""):
  config = tiny.get_config()
  with config.unlocked():
    config.checkpoints.update(llm_dir=str(llm_dir), vit_dir=str(vit_dir))
    config.mesh.shape.data = 1
  return config


def _refused_before_work(config, tmp_path, monkeypatch, error, match):
  """trainer_lib.run raises ``error`` before building the step; the workdir is never made."""
  def no_build(*args, **kwargs):
    raise AssertionError("trainer_lib.build reached: the check came too late")
  monkeypatch.setattr(trainer_lib, "build", no_build)
  workdir = tmp_path / "workdir"
  t0 = time.perf_counter()
  with pytest.raises(error, match=match) as info:
    trainer_lib.run(config, str(workdir))
  assert time.perf_counter() - t0 < 30
  assert "\n" not in str(info.value)
  assert not workdir.exists()
  return str(info.value)


def test_gpt2_dir_as_llm_dir(tmp_path, monkeypatch):
  d = tmp_path / "gpt2"
  transformers.GPT2LMHeadModel(transformers.GPT2Config(
      n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64)).save_pretrained(d)
  message = _refused_before_work(_config(llm_dir=d), tmp_path, monkeypatch, CheckpointError,
                                 "model_type='gpt2' is not supported")
  assert str(d) in message and "checkpoints.llm_dir" in message and "'llama'" in message
  with pytest.raises(CheckpointError, match="model_type='gpt2'"):
    convert.load_llama(d)


def test_dinov2_dir_as_llm_dir(tmp_path, monkeypatch):
  d = tmp_path / "dinov2"
  transformers.Dinov2Model(transformers.Dinov2Config(
      hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
      image_size=28, patch_size=14)).save_pretrained(d)
  message = _refused_before_work(_config(llm_dir=d), tmp_path, monkeypatch, CheckpointError,
                                 "model_type='dinov2' is not supported")
  assert str(d) in message and "give it as checkpoints.vit_dir" in message
  # And the reverse: a Llama as the vision tower.
  llama = tmp_path / "llama"
  transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=512, **SMALL)
                                ).save_pretrained(llama)
  with pytest.raises(CheckpointError, match=r"model_type='llama' is not supported.*"
                     r"give it as checkpoints\.llm_dir"):
    convert.load_vit(llama)


def test_qwen2_refused_and_its_biases_never_dropped(tmp_path):
  d = tmp_path / "qwen2"
  transformers.Qwen2ForCausalLM(transformers.Qwen2Config(vocab_size=64, **SMALL)
                                ).save_pretrained(d)
  with pytest.raises(CheckpointError, match=rf"{d}/config.json.*model_type='qwen2'"):
    convert.load_llama(d)
  # The same tensors under a config.json that says 'llama': the q/k/v biases have no place.
  relabelled = tmp_path / "relabelled"
  relabelled.mkdir()
  hf = hf_io.read_config(d)
  hf.update(model_type="llama", architectures=["LlamaForCausalLM"])
  (relabelled / "config.json").write_text(json.dumps(hf))
  hf_io.write_safetensors(relabelled / "model.safetensors", hf_io.load_tensors(d))
  with pytest.raises(CheckpointError, match=r"6 tensors .* would be dropped: "
                     r"model\.layers\.0\.self_attn\.k_proj\.bias \(32,\)") as info:
    convert.load_llama(relabelled)
  for i in range(2):
    for proj in ("q", "k", "v"):
      assert f"model.layers.{i}.self_attn.{proj}_proj.bias" in str(info.value)


def test_rotary_buffers_stay_allowed(tmp_path):
  d = tmp_path / "llama"
  transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=64, **SMALL)
                                ).save_pretrained(d)
  tensors = hf_io.load_tensors(d)
  tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
  hf_io.write_safetensors(d / "model.safetensors", tensors)
  _, params = convert.load_llama(d)
  np.testing.assert_array_equal(params["norm"]["scale"], tensors["model.norm.weight"])


def test_vocab_smaller_than_the_tokenizer_stops_before_compiling(tmp_path, monkeypatch):
  d = tmp_path / "llama256"
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=256, **SMALL)
                                ).save_pretrained(d)
  message = _refused_before_work(_config(llm_dir=d), tmp_path, monkeypatch, ConfigError,
                                 r"512 ids, the embedding table model\.llm\.vocab_size=256")
  assert f"{d}/config.json" in message and "ids 256..511 have no row" in message


def test_special_ids_and_patch_grid_are_named():
  tok = tokenizer.load_tokenizer("")
  config = tiny.get_config()
  assert preflight.agreement_problems(config, tok) == []
  with config.unlocked():
    config.model.image_token_id = tok.eos_token_id
    config.model.vit.image_size = 36
  problems = preflight.agreement_problems(config, tok)
  assert problems == [
      "model.image_token_id=2 is also the tokenizer eos_token_id: those tokens would be "
      "replaced by image features",
      "model.vit.image_size=36 is not a multiple of model.vit.patch_size=8"]
  with config.unlocked():
    config.model.image_token_id = 700
    config.model.vit.image_size = 32
    config.data.max_len = 16
  with pytest.raises(ConfigError, match=r"model\.image_token_id=700 is outside the embedding "
                     r"table \[0, 512\); 16 image tokens .* data\.max_len=16"):
    preflight.check_agreement(config, tok)


def test_config_differences():
  saved = {"llm": {"hidden_size": 32, "rope_scaling": {"factor": 1.0}}, "dtype": "float32"}
  requested = {"llm": {"hidden_size": 64, "rope_scaling": {"factor": 1.0}, "extra": 1},
               "dtype": "bfloat16"}
  assert preflight.config_differences(saved, requested, prefix="model.") == [
      ("model.dtype", "float32", "bfloat16"), ("model.llm.extra", "<absent>", 1),
      ("model.llm.hidden_size", 32, 64)]
  assert preflight.config_differences(saved, requested, prefix="model.",
                                      may_change=["model.dtype", "model.llm.e*"]) == [
      ("model.llm.hidden_size", 32, 64)]
