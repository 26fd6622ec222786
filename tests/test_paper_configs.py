"""Paper configs: same sections and keys as configs/tiny.py (so the trainer runs any of
them), the paper's numbers, abstract init of the 7B model with jax.eval_shape and its
parameter counts, and sweeps that only name existing fields; every config's values are
exactly those of the configs before they were rebuilt from configs/common.py pieces
(paper_configs_expected.json: each module's default ``to_dict()`` and, per config arg, the
fields that differ from it, generated from the old chained configs)."""

import json
import pathlib

import flax.linen as nn
import jax
import pytest

from configs import (
    capellm_mp100,
    demo,
    kptllm_ap10k,
    kptllm_mp100,
    locllm_coco,
    locllm_h36m,
    posellm_coco,
    tiny,
)
from kptjax.models import kptllm, vlm
from kptjax.models.lora import count_params, trainable_mask

PAPER_CONFIGS = {"locllm_coco": locllm_coco, "posellm_coco": posellm_coco,
                 "capellm_mp100": capellm_mp100, "kptllm_mp100": kptllm_mp100,
                 "kptllm_ap10k": kptllm_ap10k}


EXPECTED = json.loads((pathlib.Path(__file__).parent / "paper_configs_expected.json").read_text())
ALL_CONFIGS = {**PAPER_CONFIGS, "locllm_h36m": locllm_h36m, "tiny": tiny, "demo": demo}
ABSENT = "<absent>"   # a field the variant does not have (e.g. locllm_h36m:h36m_only's mpii)


def _flat(d, prefix=""):
  """Nested dict -> {'a.b': json text of the value} (json text: 1 and 1.0 differ)."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = json.dumps(v)
  return out


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_values_are_the_old_configs_values(name):
  want = EXPECTED[name]
  module = ALL_CONFIGS[name]
  default = _flat(want["default"])
  assert _flat(module.get_config().to_dict()) == default
  assert len(want["variants"]) >= 3
  for arg, changed in want["variants"].items():
    got = _flat(module.get_config(arg).to_dict())
    want_arg = {**default, **{k: json.dumps(v) for k, v in changed.items()}}
    assert got == {k: v for k, v in want_arg.items() if v != json.dumps(ABSENT)}, arg
  if hasattr(module, "sweep"):
    assert json.loads(json.dumps(module.sweep())) == want["sweep"]


def _keys(c, prefix=""):
  out = set()
  for k, v in c.items():
    out.add(prefix + k)
    if hasattr(v, "items"):
      out |= _keys(v, f"{prefix}{k}.")
  return out


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
@pytest.mark.parametrize("arg", [None, "runlocal", "epochs=3,batch=32"])
def test_same_layout_as_tiny(name, arg):
  c = PAPER_CONFIGS[name].get_config(arg)
  ref = tiny.get_config()
  assert _keys(c) == _keys(ref)   # every section, at every level
  assert c.model.vit.image_size % c.model.vit.patch_size == 0


def test_locllm_numbers():
  c = locllm_coco.get_config()
  m = c.model
  assert (m.vit.image_size, m.vit.patch_size, m.vit.pretrained_image_size) == (224, 14, 518)
  assert (m.vit.hidden_size, m.vit.num_layers, m.vit.num_heads) == (1024, 24, 16)
  assert (m.llm.vocab_size, m.llm.hidden_size, m.llm.num_layers, m.llm.num_heads,
          m.llm.intermediate_size) == (32000, 4096, 32, 32, 11008)
  assert m.projector.kind == "linear" and posellm_coco.get_config().model.projector.kind == (
      "mlp2x_gelu")
  assert (m.lora.rank, m.lora.alpha, m.lora.dropout) == (8, 16.0, 0.05)
  assert m.lora.vit_targets == ["query", "value"] and m.lora.llm_targets == ["q_proj", "v_proj"]
  o = c.optim
  assert (o.name, o.lr, o.weight_decay, o.warmup_ratio, o.schedule) == (
      "adamw", 5e-4, 0.05, 0.03, "cosine")
  assert c.train.batch_size == 64 and c.data.train.source == "coco"
  assert c.train.num_steps == 12 * -(-149_813 // 64)
  assert locllm_coco.get_config("epochs=3").train.num_steps == 3 * -(-149_813 // 64)


def test_capellm_numbers():
  m = capellm_mp100.get_config().model
  assert (m.llm.vocab_size, m.llm.hidden_size, m.llm.num_layers, m.llm.num_heads,
          m.llm.num_kv_heads, m.llm.intermediate_size, m.llm.rope_theta) == (
              128256, 4096, 32, 32, 8, 14336, 500000.0)
  assert dict(m.llm.rope_scaling) == dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0,
                                          original_max_position_embeddings=8192)
  c = capellm_mp100.get_config("split=3")
  assert c.data.train.source == "mp100" and c.data.template == "capellm"
  assert c.data.eval.split == "mp100_split3_test"


def test_locllm_abstract_init_parameter_counts():
  """jax.eval_shape builds the 7B model's param shapes without allocating them.

  Trainable = projector 1024*4096 + 4096 = 4,198,400
            + LLM LoRA 32 layers * (q, v) * 8 * (4096 + 4096) = 4,194,304
            + ViT LoRA 24 layers * (q, v) * 8 * (1024 + 1024) = 786,432
            = 9,179,136, which is 8.75 * 2^20: the paper's "8.7M" counts in units of 2^20.
  """
  c = locllm_coco.get_config()
  params = nn.meta.unbox(vlm.abstract_params(c.model))
  leaves = jax.tree_util.tree_leaves(params)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  total = count_params(params)
  trainable = count_params(params, trainable_mask(params, c.optim.trainable))
  print(f"locllm_coco: total {total:,} params, trainable {trainable:,} "
        f"({trainable / 2**20:.2f} x 2^20; paper: 8.7M)")
  assert trainable == 9_179_136
  assert 8.7 <= trainable / 2**20 < 8.8
  assert count_params(params["llm"]) == 6_738_415_616 + 4_194_304      # Llama-2-7B + LoRA
  # transformers Dinov2Model (large) has 304,368,640 params incl. the unused mask token [1024].
  assert count_params(params["vit"]) == 304_368_640 - 1024 + 786_432
  assert total == 7_051_962_368


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_sweeps_name_existing_fields(name):
  module = PAPER_CONFIGS[name]
  runs = module.sweep()
  assert runs
  for arg, overrides in runs:
    c = module.get_config(arg)
    for field, value in overrides.items():
      *parents, leaf = field.split(".")
      node = c
      for p in parents:
        node = node[p]
      assert leaf in node, field
      node[leaf] = value    # locked configs accept only existing fields of the same type


def test_kptllm_numbers():
  c = kptllm_mp100.get_config("split=4,shots=5")
  m = c.model
  assert (m.vit.image_size, m.vit.patch_size, m.vit.feature_layer) == (336, 14, -2)
  assert m.projector.kind == "mlp2x_gelu" and m.kpt.enabled and m.kpt.extractor_layers == 2
  assert (m.lora.rank, m.lora.alpha) == (128, 256.0) and m.lora.vit_targets == []
  assert (m.llm.vocab_size, m.kpt.prompt_token_id, m.kpt.keypoint_token_id) == (32000, 3, 4)
  assert (c.optim.lr, c.optim.weight_decay, c.optim.l1_weight, c.train.batch_size) == (
      2e-4, 0.0, 2.0, 128)
  assert c.optim.trainable == "lora+vit+projector"
  assert c.data.coord_format == "keypoint_token" and c.data.shots == 5
  assert c.data.train.split == "mp100_split4_train" and c.data.eval.split == "mp100_split4_test"
  assert c.data.tasks == "visual:1,semantic:1"
  a = kptllm_ap10k.get_config()
  assert a.data.tasks == "textual:1" and a.data.train.source == "ap10k_family"
  assert (a.data.train.options, a.data.eval.options) == ("families=Bovidae", "families=Canidae")
  assert kptllm_ap10k.get_config("order=same").data.eval.options == "families=Felidae"
  cape = capellm_mp100.get_config().model
  assert cape.image_token_id == 128002 and (cape.kpt.prompt_token_id,
                                            cape.kpt.keypoint_token_id) == (128003, 128005)


def test_kptllm_abstract_init_trains_vit_lora_projector_prompt_modules_and_head():
  c = kptllm_mp100.get_config()
  params = nn.meta.unbox(kptllm.abstract_params(c.model))
  trainable = count_params(params, trainable_mask(params, c.optim.trainable))
  frozen_llm = count_params(params["llm"]) - 32 * 128 * (
      4 * (4096 + 4096) + 3 * (4096 + 11008))                       # LLM LoRA, 7 targets
  extra = sum(count_params(params[k]) for k in ("vit", "projector", "prompt_encoder",
                                                "prompt_extractor", "prompt_projector",
                                                "keypoint_head"))
  assert trainable == count_params(params) - frozen_llm
  assert trainable == extra + (count_params(params["llm"]) - frozen_llm)
  assert count_params(params["prompt_extractor"]) > 0 and count_params(params["keypoint_head"]) > 0
