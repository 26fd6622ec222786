r"""Decoding speed: the kptjax decode engine vs LocLLM's way in torch, same weights, same run.

    python experiments/bench_decode.py                 # tiny and "small"
    python experiments/bench_decode.py --quick         # 2 persons a size, 1 round

Sizes: ``tiny`` (configs/tiny.py) and ``small`` (DINOv2 ViT-S/14-like at 224 px = 256 image
tokens, an 8-layer 512-wide Llama with a 32,000 vocabulary; the COCO keypoints'
LocLLM prompts, 17 keypoints, 13 new tokens). Both sides get the same randomly
initialized Hugging Face checkpoints (DINOv2 + Llama, written to a temporary dir) and
the same person crops and questions:

  kptjax   ``kptjax.inference.decode.Localizer`` (``Decoder.shared``): crop encoded once per person,
           the prefix prefilled and stored once, the K queries decoded as one batch of
           ``--batch`` persons (one jitted program: while_loop, KV cache in place).
  torch    what LocLLM's valid2d.py does: per person, K prompts in one
           ``generate(do_sample=False)`` batch (left padding), the crop encoded K times,
           ``transformers`` modules (Dinov2Model -> projector -> LlamaForCausalLM).

The two are timed interleaved (``--repeats`` rounds, median), after a warm-up call whose
time is reported apart as compile time. Printed per size: persons/s and keypoints/s, the
ratio, whether every generated token is identical, the model FLOPs per person each side
computes (counted from the shapes), the FLOP/s that makes and its fraction of the
machine's measured matmul rate (f32 2048^3, jax and torch), and one decode step's cost
per person ((time at M tokens - time at 1 token) / (M - 1)). Tables also go to
``--out`` (CSV + Markdown).

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

from kptjax import xla_cpu  # noqa: E402  pylint: disable=wrong-import-position


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
# FLOPs counted from the shapes (2 per multiply-add; matmuls and attention only).


def vit_flops(v: Any, projector_out: int) -> float:
  """One crop through the ViT and a linear projector."""
  n = (v.image_size // v.patch_size) ** 2
  t = 1 + v.num_register_tokens + n
  d, f = v.hidden_size, v.intermediate_size
  per_layer = 2 * t * (4 * d * d + 2 * d * f) + 4 * t * t * d
  return 2 * n * v.patch_size ** 2 * 3 * d + v.num_layers * per_layer + 2 * n * d * projector_out


def llm_token_flops(l: Any, context: float, logits: bool, kv_only_last: bool = False) -> float:
  """One token through the Llama at a context of ``context`` keys; ``kv_only_last``:
  the last block computes only the token's key and value (nobody reads its output)."""
  d, h = l.hidden_size, l.head_dim
  kv = 4 * d * h * l.num_kv_heads
  full = kv + 4 * d * h * l.num_heads + 6 * d * l.intermediate_size + 4 * context * l.num_heads * h
  blocks = l.num_layers * full if not kv_only_last else (l.num_layers - 1) * full + kv
  return blocks + (2 * d * l.vocab_size if logits else 0)


def _span(l: Any, start: int, count: int, logits: bool = False,
          kv_only_last: bool = False) -> float:
  """``count`` tokens at contexts start+1 .. start+count."""
  return sum(llm_token_flops(l, start + i + 1, logits, kv_only_last) for i in range(count))


def flops_per_person(model_config: Any, prefix_len: int, query_lens: Sequence[int],
                     steps: Sequence[int], shared: bool) -> float:
  """Model FLOPs of one person: the kptjax engine (``shared``: one crop, the prefix once,
  logits and the last block's output only at each query's last token and each fed
  token) or LocLLM's rows (a crop and the whole row per keypoint, logits at its last
  token). ``steps``: tokens fed after the prompt, per query."""
  l = model_config.llm
  vit = vit_flops(model_config.vit, l.hidden_size)
  total = 0.0 if not shared else vit + _span(l, 0, prefix_len, kv_only_last=True)
  for tq, fed in zip(query_lens, steps):
    start = prefix_len if shared else 0
    count = tq if shared else prefix_len + tq
    total += 0.0 if shared else vit
    total += _span(l, start, count - 1, kv_only_last=shared)
    total += llm_token_flops(l, start + count, True)
    total += _span(l, start + count, fed, logits=True)
  return total


def matmul_rates(n: int = 2048, repeats: int = 5) -> dict[str, float]:
  """GFLOP/s of an f32 n^3 matmul, best of ``repeats``, in jax and in torch."""
  import jax
  import jax.numpy as jnp
  import torch
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)).astype(np.float32))
  mm = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(mm(a, a))
  ta = torch.from_numpy(np.array(a))
  torch.mm(ta, ta)
  best = {"jax": 0.0, "torch": 0.0}
  for _ in range(repeats):
    for name, fn in (("jax", lambda: jax.block_until_ready(mm(a, a))),
                     ("torch", lambda: torch.mm(ta, ta))):
      start = time.perf_counter()
      fn()
      best[name] = max(best[name], 2 * n ** 3 / (time.perf_counter() - start) / 1e9)
  return best


# ---------------------------------------------------------------------------
# The benchmark.


def _timed(fn) -> tuple[float, Any]:
  """(seconds, result) of one call."""
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def run_size(name: str, config: Any, persons: int, batch: int, repeats: int,
             max_new_tokens: int, rates: dict[str, float], step_cost: bool) -> list[dict]:
  """The rows of one size's table (module docstring)."""
  import ml_collections

  from kptjax import convert
  from kptjax.data import tokenizer as tok_lib
  from kptjax.inference import decode
  from kptjax.keypoints import get_spec
  from kptjax.models import vlm

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
    side = config.model.vit.image_size
    crops = np.random.default_rng(0).normal(size=(persons, side, side, 3)).astype(np.float32)
    k = len(spec.names)

    def localizer(m):
      return decode.Localizer(config, model, params, tokenizer, spec.names, descriptions,
                              share_prefix=True, max_new_tokens=m)

    def kptjax_all(loc):
      outs = [loc.decode(crops[i:i + batch]) for i in range(0, persons, batch)]
      return tuple(np.concatenate([o[j] for o in outs]) for j in range(3))

    def torch_all(m):
      return [torch_ref.generate(np.repeat(crops[p:p + 1], k, 0), prompt_rows, m, loc.eos_id)
              for p in range(persons)]

    loc = localizer(max_new_tokens)
    full, lengths = loc.prompts.full_rows()
    prompt_rows = [list(full[i, :lengths[i]]) for i in range(k)]
    compile_jax, _ = _timed(lambda: loc.decode(crops[:batch]))
    compile_torch, _ = _timed(lambda: torch_ref.generate(
        np.repeat(crops[:1], k, 0), prompt_rows, max_new_tokens, loc.eos_id))
    times = {"kptjax": [], "torch": []}
    for _ in range(repeats):                         # interleaved rounds
      sec, jax_out = _timed(lambda: kptjax_all(loc))
      times["kptjax"].append(sec)
      sec, torch_out = _timed(lambda: torch_all(max_new_tokens))
      times["torch"].append(sec)
    same = all(np.array_equal(jax_out[0][p], torch_out[p][0]) for p in range(persons))
    step = {}
    if step_cost:                                    # one decode step, per person
      one = localizer(1)
      one.decode(crops[:batch])
      t1 = min(_timed(lambda: kptjax_all(one))[0] for _ in range(repeats))
      step["kptjax"] = (min(times["kptjax"]) - t1) / (max_new_tokens - 1) / persons
      t1 = min(_timed(lambda: torch_all(1))[0] for _ in range(repeats))
      step["torch"] = (min(times["torch"]) - t1) / (max_new_tokens - 1) / persons
  tp = len(loc.prompts.prefix)
  fed = np.maximum(jax_out[2] - 1, 0).max(axis=0)   # tokens fed after the prompt, per query
  rows = []
  for impl, shared, rate in (("kptjax", True, rates["jax"]), ("torch LocLLM-style", False,
                                                               rates["torch"])):
    key = "kptjax" if shared else "torch"
    sec = float(np.median(times[key]))
    flops = flops_per_person(config.model, tp, [int(x) for x in loc.prompts.lengths],
                             [int(x) for x in fed], shared)
    achieved = flops * persons / sec / 1e9
    rows.append({"size": name, "impl": impl, "persons_per_s": persons / sec,
                 "keypoints_per_s": persons * k / sec,
                 "compile_s": compile_jax if shared else compile_torch,
                 "gflop_per_person": flops / 1e9, "gflop_per_s": achieved,
                 "matmul_gflop_per_s": rate, "roofline_fraction": achieved / rate,
                 "step_ms_per_person": 1e3 * step[key] if step else float("nan"),
                 "tokens_identical": same})
  for r in rows:
    r["speedup_vs_torch"] = r["persons_per_s"] / rows[-1]["persons_per_s"]
  return rows


# The "small" size: ViT-S/14 at 224 px (256 image tokens), 8 x 512 Llama, 32k vocab.
SMALL = ["model.vit.image_size=224", "model.vit.patch_size=14", "model.vit.hidden_size=384",
         "model.vit.num_layers=12", "model.vit.num_heads=6", "model.vit.intermediate_size=1536",
         "model.vit.pretrained_image_size=224",
         "model.llm.hidden_size=512", "model.llm.num_layers=8", "model.llm.num_heads=8",
         "model.llm.num_kv_heads=8", "model.llm.intermediate_size=1376",
         "model.llm.vocab_size=32000"]


def _config(path: str, overrides: Sequence[str]) -> Any:
  import ast
  import importlib.util

  import ml_collections
  path, _, arg = path.partition(":")
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = ml_collections.ConfigDict(module.get_config(arg or None).to_dict())
  for item in overrides:
    key, _, value = item.partition("=")
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = ast.literal_eval(value)
  config.model.llm.head_dim = config.model.llm.hidden_size // config.model.llm.num_heads
  return config.lock()


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="configs/tiny.py",
                      help="config file[:arg] (the model shape; weights are random)")
  parser.add_argument("--sizes", default="tiny,small", help="comma list of tiny, small")
  parser.add_argument("--persons", type=int, default=0,
                      help="persons per size (default: 32 tiny, 8 small; --quick 2)")
  parser.add_argument("--batch", type=int, default=8, help="kptjax persons per batch")
  parser.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds")
  parser.add_argument("--max-new-tokens", type=int, default=13)
  parser.add_argument("--quick", action="store_true",
                      help="2 persons a size, 1 round, no step cost")
  parser.add_argument("--out", default="experiments/results/bench_decode")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override, e.g. model.llm.hidden_size=256 (repeat)")
  parser.add_argument("--xla_default", action="store_true",
                      help="run XLA's own CPU defaults, not kptjax.xla_cpu's (which the "
                           "mains set): the comparison of the two")
  args = parser.parse_args(argv)
  if not args.xla_default:
    xla_cpu.configure()   # before jax starts, as the mains do
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
  from kptjax.evaluation.metrics import markdown_table
  rates = matmul_rates()
  print(f"measured matmul rate (f32 2048^3): jax {rates['jax']:.1f} GFLOP/s, "
        f"torch {rates['torch']:.1f} GFLOP/s")
  rows = []
  for size in args.sizes.split(","):
    config = _config(args.config, (SMALL if size == "small" else []) + args.set)
    persons = args.persons or (2 if args.quick else (8 if size == "small" else 32))
    batch = min(args.batch, persons)
    m = config.model
    print(f"{size}: vit {m.vit.hidden_size}x{m.vit.num_layers} at {m.vit.image_size}px/"
          f"{m.vit.patch_size}, llm {m.llm.hidden_size}x{m.llm.num_layers} vocab "
          f"{m.llm.vocab_size}; {persons} persons, kptjax {batch} a batch", flush=True)
    start = time.perf_counter()
    rows += run_size(size, config, persons, batch, 1 if args.quick else args.repeats,
                     args.max_new_tokens, rates, step_cost=not args.quick)
    print(markdown_table([r for r in rows if r["size"] == size], digits=3))
    print(f"({time.perf_counter() - start:.0f} s)", flush=True)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "bench_decode.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  with open(os.path.join(args.out, "bench_decode.md"), "w") as f:
    f.write(f"matmul f32 2048^3: jax {rates['jax']:.1f}, torch {rates['torch']:.1f} GFLOP/s\n\n")
    f.write(markdown_table(rows, digits=3))


if __name__ == "__main__":
  main()
