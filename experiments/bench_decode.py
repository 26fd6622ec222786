r"""Decoding speed: the kptjax decoder vs LocLLM's way in torch, same weights, same run.

    python experiments/bench_decode.py --config configs/tiny.py --persons 16 --out results/bench

Both sides get the same randomly initialized Hugging Face checkpoints (DINOv2 + Llama,
shaped by ``config.model``, written to a temporary dir) and the same person crops and
questions (the keypoint spec's names and descriptions, the config's template):

  kptjax   ``kptjax.decode.Localizer``: crop encoded once per person, shared prefix
           prefilled once, K queries decoded as a batch (jit, while_loop, KV cache);
           also the kptjax slow path (one row per keypoint, share_prefix=False).
  torch    what LocLLM's valid2d.py does: per person, K prompts in one
           ``generate(do_sample=False)`` batch (left padding), the crop encoded K times,
           ``transformers`` modules (Dinov2Model -> projector -> LlamaForCausalLM).

Prints persons/s and keypoints/s of each and the ratio, and writes ``bench_decode.csv``
and ``bench_decode.md`` to ``--out``. Compilation is excluded (one warm-up batch each).

``TorchLocLLM`` and ``make_hf_checkpoints`` are also the torch reference of
tests/test_decode.py.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from typing import Any, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---------------------------------------------------------------------------
# The torch reference.


def make_hf_checkpoints(model_config: Any, out_dir: str, seed: int = 0,
                        perturb: float = 0.02) -> tuple[str, str]:
  """Random tiny HF checkpoints shaped like ``model_config``: (vit_dir, llm_dir).

  Weights are perturbed from their init (norm scales, biases, LayerScale not trivial).
  """
  import torch
  import transformers
  torch.manual_seed(seed)
  v, l = model_config.vit, model_config.llm
  vit = transformers.Dinov2Model(transformers.Dinov2Config(
      hidden_size=v.hidden_size, num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
      mlp_ratio=v.intermediate_size // v.hidden_size, image_size=v.image_size,
      patch_size=v.patch_size, layerscale_value=v.layerscale_value,
      layer_norm_eps=v.layer_norm_eps, qkv_bias=v.qkv_bias))
  llm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=l.vocab_size, hidden_size=l.hidden_size, intermediate_size=l.intermediate_size,
      num_hidden_layers=l.num_layers, num_attention_heads=l.num_heads,
      num_key_value_heads=l.num_kv_heads, head_dim=l.head_dim, rope_theta=l.rope_theta,
      rms_norm_eps=l.rms_norm_eps, max_position_embeddings=l.max_position_embeddings,
      tie_word_embeddings=l.tie_word_embeddings))
  with torch.no_grad():
    for model in (vit, llm):
      for p in model.parameters():
        p.add_(torch.randn_like(p) * perturb)
  vit_dir, llm_dir = os.path.join(out_dir, "vit"), os.path.join(out_dir, "llm")
  vit.save_pretrained(vit_dir)
  llm.save_pretrained(llm_dir)
  return vit_dir, llm_dir


class TorchLocLLM:
  """DINOv2 patch tokens -> projector -> Llama, in transformers' torch modules.

  Args:
    vit_dir, llm_dir: HF checkpoint dirs.
    projector_params: kptjax projector params ({'fc1': {kernel, bias}[, 'fc2': ...]}).
    image_token_id: the placeholder id filled with image tokens.
  """

  def __init__(self, vit_dir: str, llm_dir: str, projector_params: Any, image_token_id: int):
    import torch
    import transformers
    self.torch = torch
    self.vit = transformers.Dinov2Model.from_pretrained(vit_dir).eval()
    self.llm = transformers.LlamaForCausalLM.from_pretrained(llm_dir).eval()
    layers = []
    for name in ("fc1", "fc2"):
      if name not in projector_params:
        continue
      kernel = np.asarray(projector_params[name]["kernel"], np.float32)
      lin = torch.nn.Linear(*kernel.shape)
      with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(kernel.T.copy()))
        lin.bias.copy_(torch.from_numpy(np.array(projector_params[name]["bias"], np.float32)))
      layers += [lin, torch.nn.GELU()]
    self.projector = torch.nn.Sequential(*layers[:-1]).eval()
    self.image_token_id = int(image_token_id)

  def embed_image(self, images: np.ndarray):
    """f32[B, H, W, 3] normalized -> torch [B, N, D] image tokens (class token dropped)."""
    pixels = self.torch.from_numpy(np.ascontiguousarray(images, np.float32)).permute(0, 3, 1, 2)
    hidden = self.vit(pixel_values=pixels).last_hidden_state
    return self.projector(hidden[:, 1:])

  def generate(self, images: np.ndarray, rows: Sequence[Sequence[int]], max_new_tokens: int,
               eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """LocLLM's batch: one row per prompt, each with its own image, left-padded.

    Args:
      images: f32[B, H, W, 3] (one per row; LocLLM repeats the person's crop K times).
      rows: B token lists, each holding N image placeholders.
    Returns:
      tokens int64[B, M] (EOS-padded) and the max softmax probability f32[B, M].
    """
    torch = self.torch
    with torch.inference_mode():
      image_embeds = self.embed_image(images)
      t = max(len(r) for r in rows)
      ids = torch.full((len(rows), t), eos_id, dtype=torch.long)
      mask = torch.zeros((len(rows), t), dtype=torch.long)
      for i, r in enumerate(rows):
        ids[i, t - len(r):] = torch.tensor(list(r))
        mask[i, t - len(r):] = 1
      embeds = self.llm.get_input_embeddings()(ids)
      for i in range(len(rows)):
        slots = (ids[i] == self.image_token_id).nonzero()[:, 0]
        embeds[i, slots] = image_embeds[i, :len(slots)].to(embeds.dtype)
      out = self.llm.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False,
                              max_new_tokens=max_new_tokens, eos_token_id=eos_id,
                              pad_token_id=eos_id, suppress_tokens=[self.image_token_id],
                              output_scores=True,
                              return_dict_in_generate=True)
      tokens = out.sequences.numpy()
      probs = torch.stack([s.float().softmax(-1).max(-1).values for s in out.scores], 1).numpy()
    m = max_new_tokens
    full = np.full((len(rows), m), eos_id, np.int64)
    full[:, :tokens.shape[1]] = tokens
    full_p = np.ones((len(rows), m), np.float32)
    full_p[:, :probs.shape[1]] = probs
    return full, full_p


# ---------------------------------------------------------------------------
# The benchmark.


def _timed(fn, repeats: int) -> float:
  start = time.perf_counter()
  for _ in range(repeats):
    fn()
  return (time.perf_counter() - start) / repeats


def run(config: Any, persons: int, out_dir: str, repeats: int = 1) -> list[dict]:
  import jax
  from kptjax import convert, decode
  from kptjax.data import tokenizer as tok_lib
  from kptjax.keypoints import get_spec
  from kptjax.models import vlm

  import ml_collections
  with tempfile.TemporaryDirectory() as tmp:
    vit_dir, llm_dir = make_hf_checkpoints(config.model, tmp)
    config = ml_collections.ConfigDict(config.to_dict())
    config.checkpoints.vit_dir, config.checkpoints.llm_dir = vit_dir, llm_dir
    model_config, params = convert.load_vlm(config)
    config.model = ml_collections.ConfigDict(model_config.to_dict())
    config.lock()
    model = vlm.VLM(config.model)
    tokenizer = tok_lib.load_tokenizer(config.checkpoints.tokenizer_dir or None)
    spec = get_spec(config.data.spec)
    descriptions = spec.descriptions if config.data.use_descriptions else [None] * len(spec.names)
    torch_ref = TorchLocLLM(vit_dir, llm_dir, params["projector"], config.model.image_token_id)

    size = config.model.vit.image_size
    crops = np.random.default_rng(0).normal(size=(persons, size, size, 3)).astype(np.float32)
    affine = np.tile(np.array([[1, 0, 0], [0, 1, 0]], np.float32), (persons, 1, 1))
    k = len(spec.names)
    rows = []
    batch_persons = int(config.decode.batch_persons)
    variants = [("kptjax shared-prefix", True, batch_persons),
                ("kptjax shared-prefix, 1 person/batch", True, 1),
                ("kptjax per-keypoint rows", False, batch_persons)]
    for name, share, batch in variants:
      loc = decode.Localizer(config, model, params, tokenizer, spec.names, descriptions,
                             share_prefix=share)
      chunks = [crops[i:i + batch] for i in range(0, persons, batch)]

      def run_jax():
        for c in chunks:
          pad = np.concatenate([c, np.repeat(c[:1], batch - len(c), 0)]) if len(c) < batch else c
          jax.block_until_ready(loc.decode(pad))

      run_jax()   # compile
      sec = _timed(run_jax, repeats)
      rows.append({"impl": f"{name} (batch {batch})" if batch > 1 else name,
                   "persons_per_s": persons / sec, "keypoints_per_s": persons * k / sec})
    full, lengths = loc.prompts.full_rows()
    prompt_rows = [list(full[i, :lengths[i]]) for i in range(k)]

    def run_torch():
      for p in range(persons):
        torch_ref.generate(np.repeat(crops[p:p + 1], k, 0), prompt_rows,
                           loc.max_new_tokens, loc.eos_id)

    torch_ref.generate(np.repeat(crops[:1], k, 0), prompt_rows, loc.max_new_tokens, loc.eos_id)
    sec = _timed(run_torch, repeats)
    rows.append({"impl": "torch LocLLM-style generate", "persons_per_s": persons / sec,
                 "keypoints_per_s": persons * k / sec})
  base = rows[-1]["persons_per_s"]
  for r in rows:
    r["speedup_vs_torch"] = r["persons_per_s"] / base
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "bench_decode.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  from kptjax.metrics import markdown_table
  with open(os.path.join(out_dir, "bench_decode.md"), "w") as f:
    f.write(markdown_table(rows, digits=2))
  return rows


# A wider model than tiny (still random weights): 64 image tokens, d=256 decoder.
SMALL = ["model.vit.image_size=64", "model.vit.patch_size=8", "model.vit.hidden_size=192",
         "model.vit.num_layers=4", "model.vit.num_heads=3", "model.vit.intermediate_size=768",
         "model.llm.hidden_size=256", "model.llm.num_layers=4", "model.llm.num_heads=8",
         "model.llm.num_kv_heads=4", "model.llm.intermediate_size=688"]


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="configs/tiny.py",
                      help="config file[:arg] (the model shape; weights are random)")
  parser.add_argument("--persons", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("--out", default="results/bench_decode")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override, e.g. model.llm.hidden_size=256 (repeat)")
  parser.add_argument("--small", action="store_true",
                      help="a wider model than tiny: " + ", ".join(SMALL))
  args = parser.parse_args(argv)
  import ast
  import importlib.util
  import ml_collections
  path, _, arg = args.config.partition(":")
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = ml_collections.ConfigDict(module.get_config(arg or None).to_dict())
  for item in (SMALL if args.small else []) + args.set:
    key, _, value = item.partition("=")
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = ast.literal_eval(value)
  config.model.llm.head_dim = config.model.llm.hidden_size // config.model.llm.num_heads
  print(f"model: vit {config.model.vit.hidden_size}x{config.model.vit.num_layers} at "
        f"{config.model.vit.image_size}px/{config.model.vit.patch_size}, llm "
        f"{config.model.llm.hidden_size}x{config.model.llm.num_layers}; {args.persons} persons")
  rows = run(config.lock(), args.persons, args.out, args.repeats)
  from kptjax.metrics import markdown_table
  print(markdown_table(rows, digits=2))


if __name__ == "__main__":
  main()
