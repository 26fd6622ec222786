"""Location tokens on a real (Vicuna-shaped) checkpoint: the vocabulary grows deliberately.

A tiny random LlamaForCausalLM whose tokenizer (the bundled one, saved as an HF dir) has
<loc_0>..<loc_99>; ``coord_format='loc_tokens'`` with ``loc_bins=120`` adds <loc_100>..
<loc_119> past its 512-row table. With ``model.llm.new_token_init`` the model gets 20 new
rows (``kptjax.convert.vocab``):

* without it, the run is refused before anything is built (the message names the field);
* the checkpoint's rows load bit-identical, the new rows are the mean of the old ones;
* the model's logits over the old ids equal the torch model's (the new rows only add
  columns); a training run takes steps without NaN, the new rows train, the old stay
  bit-identical;
* greedy decoding answers in location tokens that parse back to coordinates (ids past the
  old table included);
* the Hugging Face export holds all 532 rows and loads in transformers with the same logits.
"""

import json

import jax
import ml_collections
import numpy as np
import pytest
import torch
import transformers

from configs import tiny
from kptjax import convert, evaluate, sharding
from kptjax.errors import ConfigError
from kptjax.inference import decode
from kptjax.models import vlm
from kptjax.training import metrics_writer, preflight, trainer as trainer_lib

LOC_BINS = 120
OLD_VOCAB = 512


def _hf_dir(path, tie):
  tok = evaluate.load_tokenizer(tiny.get_config())   # the bundled one, 512 ids
  tok.save_pretrained(path)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=OLD_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
      tie_word_embeddings=tie, rms_norm_eps=1e-6)).eval()
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen) if p.ndim == 1
              else 0.2 * torch.randn(p.shape, generator=gen))
  model.save_pretrained(path)
  return model


def _config(path, init="mean", steps=3):
  c = tiny.get_config("lora")
  with c.unlocked():
    c.checkpoints.update(llm_dir=str(path), tokenizer_dir=str(path))
    c.model.llm.new_token_init = init
    c.data.update(coord_format="loc_tokens", loc_bins=LOC_BINS, rounds=4)
    c.mesh.shape.data = 1
    c.optim.update(lr=1e-2, warmup_ratio=0.0, schedule="constant")
    c.train.update(num_steps=steps, log_every=1, checkpoint_every=steps, eval_every=0)
  return c


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """tie_word_embeddings -> (dir, torch model), made on first use."""
  made = {}

  def get(tie):
    if tie not in made:
      path = tmp_path_factory.mktemp("tied" if tie else "vicuna_like")
      made[tie] = (path, _hf_dir(path, tie), tie, convert.load_vlm(_config(path)))
    return made[tie]
  return get


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def hf(request, hf_dirs):
  return hf_dirs(request.param)


def test_added_tokens_are_refused_without_new_token_init(hf_dirs):
  path = hf_dirs(False)[0]
  config = preflight.with_model_config(_config(path, init=""),
                                       convert.model_config(_config(path, init="")))
  assert config.model.llm.vocab_size == OLD_VOCAB
  with pytest.raises(ConfigError, match="new_token_init"):
    preflight.check_agreement(config, evaluate.load_tokenizer(config))
  with pytest.raises(ConfigError, match="new_token_init"):
    convert.model_config(_config(path, init="zeros"))


def test_old_rows_bit_identical_new_rows_mean_logits_match_torch(hf):
  path, model, tie, (mc, params) = hf
  assert (mc.llm.vocab_size, mc.llm.new_tokens) == (OLD_VOCAB + 20, 20)
  llm = params["llm"]
  old = model.model.embed_tokens.weight.detach().numpy()
  np.testing.assert_array_equal(np.asarray(llm["embed_tokens"]["embedding"]), old)
  new = np.asarray(llm["embed_tokens"]["new_embedding"])
  np.testing.assert_allclose(new, np.broadcast_to(old.astype(np.float64).mean(0), new.shape),
                             rtol=1e-6, atol=1e-7)
  assert ("new_lm_head" in llm) == (not tie)
  if not tie:
    head = model.lm_head.weight.detach().numpy()                        # [V, D]
    np.testing.assert_array_equal(np.asarray(llm["lm_head"]["kernel"]), head.T)
    np.testing.assert_allclose(np.asarray(llm["new_lm_head"]).T,
                               np.broadcast_to(head.astype(np.float64).mean(0), (20, head.shape[1])),
                               rtol=1e-6, atol=1e-7)
  # Text-only forward through the converted LLM: old columns equal torch's.
  tokens = np.array([[1, 17, 230, 5, 611 - 100, 300]], np.int32)
  net = vlm.VLM(mc)
  ours = net.apply({"params": params}, tokens, method=lambda m, t: m.llm(t))
  ours = np.asarray(ours[0] if isinstance(ours, tuple) else ours)
  with torch.no_grad():
    ref = model(torch.tensor(tokens)).logits.numpy()
  assert ours.shape[-1] == OLD_VOCAB + 20
  np.testing.assert_allclose(ours[..., :OLD_VOCAB], ref, rtol=2e-4, atol=2e-4)


def test_train_decode_export(hf_dirs, tmp_path):
  """On the untied (Vicuna) layout; the tied head's columns are checked above."""
  path, _, tie, (mc, params0) = hf_dirs(False)
  config = _config(path)
  one = jax.make_mesh((1, 1, 1), sharding.MESH_AXES, devices=jax.devices()[:1],
                      axis_types=(jax.sharding.AxisType.Auto,) * 3)
  state = trainer_lib.run(config, str(tmp_path / "run"), mesh=one)
  rows = [r for r in metrics_writer.read_metrics(str(tmp_path / "run")) if "loss" in r]
  assert len(rows) == config.train.num_steps
  assert all(np.isfinite(r["loss"]) for r in rows)
  llm, llm0 = jax.device_get(state.params["llm"]), params0["llm"]
  np.testing.assert_array_equal(llm["embed_tokens"]["embedding"],
                                llm0["embed_tokens"]["embedding"])
  assert np.max(np.abs(llm["embed_tokens"]["new_embedding"]
                       - llm0["embed_tokens"]["new_embedding"])) > 0
  if not tie:
    np.testing.assert_array_equal(llm["lm_head"]["kernel"], llm0["lm_head"]["kernel"])
    assert np.max(np.abs(llm["new_lm_head"] - llm0["new_lm_head"])) > 0
  saved = json.loads((tmp_path / "run" / preflight.MODEL_CONFIG_FILE).read_text())
  assert saved["llm"]["new_tokens"] == 20

  # Greedy decoding (constrained to location tokens) answers with ids of both tables.
  run_config = preflight.with_model_config(config, mc)
  tok = evaluate.load_tokenizer(run_config)
  names = ["nose", "left eye", "right eye", "left wrist"]
  localizer = decode.Localizer(run_config, vlm.VLM(mc), jax.device_get(state.params), tok,
                               names, [None] * len(names))
  crops = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  tokens, _, _ = localizer.decode(crops)
  assert tokens.max() < OLD_VOCAB + 20
  affine = np.tile(np.array([[1.0, 0, 0], [0, 1.0, 0]], np.float32), (2, 1, 1))
  loc = localizer(crops, affine)
  assert not np.any(loc.missing)
  assert np.all((loc.values >= 0) & (loc.values <= 1))
  assert all(t.startswith("<loc_") for row in loc.texts for t in row)
  # An answer in the added rows' ids parses back to its bins' centres.
  ids = tok.convert_tokens_to_ids(["<loc_110>", "<loc_3>", "<loc_119>"])
  assert ids[0] >= OLD_VOCAB and ids[2] >= OLD_VOCAB and ids[1] < OLD_VOCAB
  parsed = localizer.scorer(ids[:2] + [localizer.eos_id], [0.9, 0.7, 1.0])
  assert parsed.ok
  np.testing.assert_allclose(parsed.values, [110.5 / LOC_BINS, 3.5 / LOC_BINS])

  # Export: all 532 rows, loaded by transformers, same logits as the kptjax model.
  merged = ml_collections.ConfigDict(mc.to_dict())
  out = convert.export_llama_hf(jax.device_get(state.params), mc.llm, tmp_path / "hf",
                                lora_scale=mc.lora.alpha / mc.lora.rank)
  hf_model = transformers.LlamaForCausalLM.from_pretrained(out).eval()
  assert hf_model.config.vocab_size == OLD_VOCAB + 20
  probe = np.array([[1, 17, 230, 520, 531, 300]], np.int32)
  ours = vlm.VLM(merged).apply({"params": jax.device_get(state.params)}, probe,
                               method=lambda m, t: m.llm(t))
  ours = np.asarray(ours[0] if isinstance(ours, tuple) else ours)
  with torch.no_grad():
    ref = hf_model(torch.tensor(probe)).logits.numpy()
  np.testing.assert_allclose(ours, ref, rtol=2e-4, atol=2e-4)
