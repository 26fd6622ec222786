r"""Train-step speed: kptjax vs torch + peft on the same weights and batch, the demo's
step before / after its recipe change, FLOP counts that agree, and the per-device memory
of every paper config under FSDP (AOT, nothing allocated; ``experiments/aot_memory.py``).

    python experiments/bench_train.py --out experiments/results/bench_train

Sizes (``--configs``):
  tiny   configs/tiny.py:lora.
  small  the issue's: batch 8, 224 px / 14 px patches (256 image tokens) + 64 text tokens,
         a DINOv2-S/14-like ViT (12 x 384) and an 8-layer 512-wide Llama, LoRA r=8 on q/v
         of both towers, LoRA + projector trained with AdamW.
  demo   configs/demo.py recipes (``--demo_variants``, ';' separated config args; default
         the earlier default recipe ``ffn=4,scan=1,steps=2100,decay=0.2`` (the reference,
         0.92 s a step on the slow 2-core machines) and today's default), kptjax only (the
         demo's sin-cos ViT positions have no transformers counterpart), each on the demo's
         2 CPU devices: the ratio to the reference predicts each recipe's training time
         on those machines.

Every row runs with the XLA CPU flags and process settings the mains set
(``kptjax.xla_cpu``; the flags printed first); ``--xla_default`` runs XLA's own defaults
instead, for the comparison of the two.

For tiny and small both sides get the same random Hugging Face checkpoints (DINOv2 +
Llama written to a temp dir, as experiments/bench_decode.py makes them), the same
projector and LoRA factors, and one batch of the real pipeline; they train LoRA +
projector with AdamW, clipping and the masked token loss:

  kptjax   ``kptjax.training.trainer.build`` step (jit, donated state), as configured, then
           each of ``--kptjax_variants`` (';'-separated config.model overrides; default
           ``KPTJAX_VARIANTS``: ``remat_policy=none``, what torch does: keep
           activations, and that with the folded attention and unrolled blocks; a
           ``scan_layers=False`` row gets the converted LLM params unstacked)
  torch    transformers ``Dinov2Model`` -> ``nn.Linear`` projector -> ``LlamaForCausalLM``
           with peft ``LoraConfig(target_modules=q/v)`` on both towers

The rows are timed interleaved (one round of ``--steps`` steps of every row, repeated
``--rounds`` times; the median round is reported). Per row: step time, tokens/s, model
FLOP/s and that as a fraction of the measured matmul peak (a large ``jnp.dot`` in the
step's compute dtype, printed beside the times), the first-step loss (equal on both
sides: the same model), and the time relative to the first kptjax row.

FLOPs of a step, three ways (printed per size): ``analytic_flops`` (matmuls and
attention of forward + backward, weight gradients only for the trained leaves, no remat
recompute), torch's ``FlopCounterMode`` on the torch step (it does not count the CPU
``sdpa`` attention: compare it with ``analytic_without_attention``), and XLA's cost
analysis of the step without remat and without loops (``xla_flops``; it also counts
elementwise ops). These three count the output layer at every position, as
transformers computes it. The kptjax step with ``train.loss_chunk`` (small: 64) runs it
only on the chunks that hold answer tokens (``losses.lm_stats``): ``logit_positions``
per row, ``analytic_kptjax`` the analytic count with those. The FLOP/s columns use the
analytic count of what each side computes (torch: ``analytic``; kptjax:
``analytic_kptjax``).

Then ``aot_memory.run`` on the paper configs for 8, 16 and 64 simulated devices.
Writes ``bench_train.csv``, ``bench_train_flops.csv``, ``aot_memory.csv`` and
``bench_train.md`` to --out.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import aot_memory  # pylint: disable=wrong-import-position

from kptjax import xla_cpu  # pylint: disable=wrong-import-position

# configs/demo.py args timed by ``--configs demo`` (';' separated, '' = the default recipe).
# The first is the reference: the earlier default recipe, whose step took 0.92 s on this
# project's slow 2-core machine (README, "What the demo does"), which the time column
# scales by. Every recipe runs as the demo does: on its 2 CPU devices, kptjax's XLA flags.
DEMO_VARIANTS = "ffn=4,scan=1,steps=2100,decay=0.2;"
REFERENCE_STEP_S = 0.92
# The kptjax rows of tiny and small after the one as configured: config.model overrides,
# ';' separated. remat none keeps activations, as torch does; the second row is the
# fastest layout found on the 2-core CPU (no remat, folded attention, unrolled blocks:
# no stacked scan buffers; README, "Training memory and speed").
KPTJAX_VARIANTS = "remat_policy=none;remat_policy=none,attention=folded,unroll_layers=True"


# ---------------------------------------------------------------------------- configs
def bench_config(name: str):
  """'tiny' = configs/tiny.py:lora; 'small' = the issue's size (module docstring)."""
  from configs import tiny
  config = tiny.get_config("lora")
  with config.unlocked():
    config.model.lora.dropout = 0.0
    config.mesh.shape.data = 1
    if name == "small":
      v, l = config.model.vit, config.model.llm
      v.update(image_size=224, patch_size=14, hidden_size=384, num_layers=12, num_heads=6,
               intermediate_size=1536)
      l.update(hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8,
               num_kv_heads=8, head_dim=64)
      config.model.lora.rank = 8
      config.model.lora.alpha = 16.0
      config.train.batch_size = 8
      config.data.max_len = 256 + 64
      # the paper configs' chunked loss (256 of 1,024 positions there): only the chunks
      # that hold answer tokens run the output layer (losses.lm_stats)
      config.train.loss_chunk = 64
      # 64 text tokens: 3 rounds of the compact template ('left wrist?[0.412,0.733]</s>')
      config.data.update(template="compact", use_descriptions=False, rounds=3)
    elif name != "tiny":
      raise ValueError(f"unknown bench config {name!r}")
  return config


def logit_positions(config: Any, loss_mask: np.ndarray) -> int:
  """Positions per row at which the kptjax step runs the output layer
  (``losses.lm_stats``): all of them without ``train.loss_chunk``, else the chunks that
  hold the answers of the row with the most (loss_mask f32[B,T])."""
  t, chunk = loss_mask.shape[1], int(config.train.get("loss_chunk", 0))
  if chunk <= 0 or chunk >= t:
    return t
  return chunk * -(-int((loss_mask != 0).sum(axis=1).max()) // chunk)


def analytic_flops(config: Any, batch: int, attention: bool = True,
                   logit_positions: int | None = None) -> float:
  """Matmul + attention FLOPs of one train step (forward + backward), no remat recompute.

  Forward: 2 x tokens x (kernel sizes) per linear layer, 4 x B x T^2 x (heads x head_dim)
  per attention (scores and values), 2 x B x T x D x V for the output layer. Backward:
  the input gradient of every layer after the first trained one (1x a linear layer's
  forward, 2x an attention's: dQ, dK, dP, dV; none for the patch embedding, whose input
  is the image) and the weight gradient (2 x tokens x kernel size) of the trained
  kernels only (``optim.trainable``: 'all', or LoRA factors + projector).
  ``attention=False`` leaves attention out (what torch's FlopCounterMode counts of
  transformers' CPU ``sdpa`` path: nothing). ``logit_positions`` per row run the output
  layer (default: every position, as transformers does).
  """
  v, l, lora = config.model.vit, config.model.llm, config.model.lora
  side = v.image_size // v.patch_size
  tv = 1 + v.num_register_tokens + side * side       # ViT tokens per image
  t = config.data.max_len
  all_trained = config.optim.trainable == "all"
  rank = int(lora.rank)

  def tower(tokens, seq, d, kernels, heads_dim, layers, targets):
    """(forward + input gradients, weight gradients) of a tower's blocks."""
    lin = 2 * tokens * sum(kernels.values())
    lin += sum(2 * tokens * rank * (kernels[n] // d + d) for n in targets) if rank else 0
    attn = 4 * batch * seq * seq * heads_dim if attention else 0
    wgrad = 2 * tokens * sum(kernels.values()) if all_trained else 0
    lora_w = sum(2 * tokens * rank * (kernels[n] // d + d) for n in targets) if rank else 0
    return layers * (2 * lin + 3 * attn), layers * (wgrad + lora_w)

  dv, fv = v.hidden_size, v.intermediate_size
  vit_kernels = dict(query=dv * dv, key=dv * dv, value=dv * dv, out=dv * dv,
                     fc1=dv * fv, fc2=fv * dv)
  vit, vit_w = tower(batch * tv, tv, dv, vit_kernels, dv, v.num_layers,
                     list(lora.vit_targets))
  d, f, h = l.hidden_size, l.intermediate_size, l.head_dim
  llm_kernels = dict(q_proj=d * l.num_heads * h, k_proj=d * l.num_kv_heads * h,
                     v_proj=d * l.num_kv_heads * h, o_proj=l.num_heads * h * d,
                     gate_proj=d * f, up_proj=d * f, down_proj=f * d)
  llm, llm_w = tower(batch * t, t, d, llm_kernels, l.num_heads * h, l.num_layers,
                     list(lora.llm_targets))
  patch = 2 * batch * side * side * v.patch_size ** 2 * 3 * dv
  proj_k = dv * d if config.model.projector.kind == "linear" else dv * d + d * d
  proj = 2 * batch * side * side * proj_k
  head = 2 * batch * (t if logit_positions is None else logit_positions) * d * l.vocab_size
  fwd_bwd_input = patch + vit + 2 * proj + llm + 2 * head
  weights = vit_w + llm_w + proj + (patch + head if all_trained else 0)
  return float(fwd_bwd_input + weights)


# ------------------------------------------------------------------------ torch side
class TorchTrainer:
  """The LoRA + projector train step in transformers' torch modules + peft (float32)."""

  def __init__(self, vit_dir: str, llm_dir: str, params: dict, config: Any):
    import peft
    import torch
    import transformers
    self.torch = torch
    lora = config.model.lora
    towers = []
    # (torch module name -> kptjax layer name); transformers 5 names DINOv2's q/v q_proj/v_proj
    for cls, path, targets, jax_attn in (
        (transformers.Dinov2Model, vit_dir, dict(q_proj="query", v_proj="value"),
         params["vit"]["layers"]["attention"]),
        (transformers.LlamaForCausalLM, llm_dir, dict(q_proj="q_proj", v_proj="v_proj"),
         params["llm"]["layers"]["self_attn"])):
      model = peft.get_peft_model(cls.from_pretrained(path), peft.LoraConfig(
          r=int(lora.rank), lora_alpha=float(lora.alpha), lora_dropout=0.0,
          target_modules=list(targets)))
      names = dict(model.named_modules())
      with torch.no_grad():   # the same LoRA factors as kptjax's (stacked over layers)
        for name, module in names.items():
          leaf = name.rsplit(".", 1)[-1]
          if leaf in targets and hasattr(module, "lora_A"):
            i = int(name.split(".layer.")[-1].split(".")[0] if ".layer." in name
                    else name.split(".layers.")[-1].split(".")[0])
            a, b = (jax_attn[targets[leaf]][x][i] for x in ("lora_a", "lora_b"))
            module.lora_A["default"].weight.copy_(torch.from_numpy(np.array(a, np.float32).T))
            module.lora_B["default"].weight.copy_(torch.from_numpy(np.array(b, np.float32).T))
      towers.append(model.train())
    self.vit, self.llm = towers
    modules = []
    for name in ("fc1", "fc2"):
      if name in params["projector"]:
        kernel = np.asarray(params["projector"][name]["kernel"], np.float32)
        lin = torch.nn.Linear(*kernel.shape)
        with torch.no_grad():
          lin.weight.copy_(torch.from_numpy(kernel.T.copy()))
          lin.bias.copy_(torch.from_numpy(np.array(params["projector"][name]["bias"],
                                                   np.float32)))
        modules += [lin, torch.nn.GELU()]
    self.projector = torch.nn.Sequential(*modules[:-1])
    o = config.optim
    loras = [p for m in towers for p in m.parameters() if p.requires_grad]
    decay = [p for p in self.projector.parameters() if p.ndim >= 2] + loras
    no_decay = [p for p in self.projector.parameters() if p.ndim < 2]
    self.trainable = decay + no_decay
    self.clip = o.clip_norm
    self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}],
                                 lr=o.lr, betas=(o.b1, o.b2), eps=1e-8)
    self.image_token_id = int(config.model.image_token_id)

  def step(self, batch: dict) -> float:
    torch = self.torch
    image = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2)
    tokens = torch.from_numpy(batch["tokens"]).long()
    targets = torch.from_numpy(batch["targets"]).long()
    mask = torch.from_numpy(batch["loss_mask"])
    patches = self.vit(pixel_values=image).last_hidden_state[:, 1:]
    image_embeds = self.projector(patches)
    embeds = self.llm.get_input_embeddings()(tokens)
    is_image = (tokens == self.image_token_id).unsqueeze(-1)
    slots = torch.cumsum(is_image[..., 0].long(), 1).clamp(min=1) - 1
    gathered = torch.gather(image_embeds, 1, slots.clamp(max=image_embeds.shape[1] - 1)
                            .unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
    embeds = torch.where(is_image, gathered, embeds)
    logits = self.llm(inputs_embeds=embeds,
                      attention_mask=torch.from_numpy(batch["input_mask"]).long()).logits
    ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                           reduction="none")
    loss = (ce * mask.flatten()).sum() / mask.sum().clamp(min=1)
    loss.backward()
    if self.clip:
      torch.nn.utils.clip_grad_norm_(self.trainable, self.clip)
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    return loss.item()

  def count_flops(self, batch: dict) -> float:
    """torch's FlopCounterMode over one step (forward + backward; the optimizer adds
    no matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
      self.step(batch)
    return float(counter.get_total_flops())


# ----------------------------------------------------------------------------- timing
def matmul_peak(dtype: str) -> float:
  """Measured FLOP/s of a large square matmul on the default device (best of 3)."""
  import jax
  import jax.numpy as jnp
  n = 1024 if jax.devices()[0].platform == "cpu" else 8192
  x = jnp.ones((n, n), dtype)
  f = jax.jit(lambda a: a @ a)
  jax.block_until_ready(f(x))
  reps = 5 if jax.devices()[0].platform == "cpu" else 50
  best = 0.0
  for _ in range(3):
    start = time.perf_counter()
    for _ in range(reps):
      out = f(x)
    jax.block_until_ready(out)
    best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - start))
  return best


def xla_flops(config: Any, mesh: Any) -> float:
  """XLA's cost-analysis FLOPs of the step with no remat and no loop: the LLM blocks
  unstacked, both towers' blocks unrolled (``model.unroll_layers``; XLA counts a loop
  body once, which used to hide all but one ViT block), the loss unchunked."""
  from kptjax.models import factory
  from kptjax.training import preflight, trainer as trainer_lib
  c = preflight.with_model_config(config, config.model)
  with c.unlocked():
    c.model.scan_layers, c.model.remat_policy, c.model.unroll_layers = False, "none", True
    c.train.loss_chunk = 0    # the output layer at every position, as ``analytic``
  trainer = trainer_lib.build(c, mesh)
  out = trainer.step.lower(trainer_lib.abstract_state(trainer),
                           factory.abstract_batch(c, mesh)).cost_analysis()
  return float((out[0] if isinstance(out, (list, tuple)) else out)["flops"])


def _time_rounds(fns: dict[str, Any], steps: int, rounds: int) -> dict[str, float]:
  """Median over ``rounds`` of the mean time of ``steps`` calls of each fn, interleaved."""
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn(steps)
      times[name].append((time.perf_counter() - start) / steps)
  return {name: float(np.median(t)) for name, t in times.items()}


def _kptjax_runner(config: Any, mesh: Any, batch: dict, host_params: Any = None):
  """(run(n) -> n steps on the batch, loss at step 1) for the kptjax step of config."""
  import jax

  from kptjax import sharding
  from kptjax.training import trainer as trainer_lib
  trainer = trainer_lib.build(config, mesh)
  if host_params is not None and not config.model.scan_layers and "layers" in host_params["llm"]:
    from kptjax.convert import llama as llama_convert
    host_params = {**host_params, "llm": llama_convert.unstack_layers(
        host_params["llm"], config.model.llm.num_layers)}
  state = trainer_lib.init_state(trainer, config, params=host_params)
  device_batch = sharding.shard_batch(batch, mesh)
  compiled = trainer.step.lower(state, device_batch).compile()
  holder = {}
  holder["state"], metrics = compiled(state, device_batch)
  loss1 = float(metrics["loss"])

  def run(n):
    for _ in range(n):
      holder["state"], m = compiled(holder["state"], device_batch)
    jax.block_until_ready(m)
  return run, loss1


def _one_device_mesh():
  import jax

  from kptjax import sharding
  return jax.make_mesh((1, 1, 1), sharding.MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=jax.devices()[:1])


def _rows(name, secs, losses, tokens, flops, peak):
  """One table row per timed impl; ``flops``: impl -> the analytic FLOPs it computes."""
  first = next(iter(secs.values()))
  return [dict(config=name, impl=impl, step_ms=1e3 * sec, tokens_per_s=tokens / sec,
               model_gflops_per_s=flops[impl] / sec / 1e9,
               frac_of_peak=flops[impl] / sec / peak, peak_gflops_per_s=peak / 1e9,
               loss_step1=losses[impl], vs_first=sec / first)
          for impl, sec in secs.items()]


def parse_model_overrides(text: str) -> dict[str, Any]:
  """'remat_policy=none,unroll_layers=True' -> config.model field values (Python literals
  where they parse, else strings; ``configs.common.parse_arg`` splits them)."""
  import ast

  from configs import common
  out = {}
  for key, value in common.parse_arg(text).items():
    if value is True:
      raise ValueError(f"model override {key!r}: expected key=value")
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


def model_variant(config: Any, overrides: str) -> Any:
  """A copy of ``config`` whose model section has ``overrides`` (parse_model_overrides);
  a field config.model does not have (nor ``vlm.OPTIONAL_FIELDS``) is a ValueError, so a
  typo is not a silent duplicate row."""
  from kptjax.models import vlm
  from kptjax.training import preflight
  variant = preflight.with_model_config(config, config.model)
  fields = parse_model_overrides(overrides)
  unknown = sorted(set(fields) - set(variant.model.keys()) - set(vlm.OPTIONAL_FIELDS))
  if unknown:
    raise ValueError(f"--kptjax_variants {overrides!r}: config.model has no {unknown}")
  with variant.unlocked():
    variant.model.update(fields)
  return variant


def bench_one(name: str, steps: int, rounds: int, peak: float, run_torch: bool,
              variants: str = KPTJAX_VARIANTS) -> tuple[list[dict], dict]:
  """kptjax (as configured, then each of ``variants``: ';'-separated config.model
  overrides) vs torch + peft on size ``name``."""
  import jax
  from bench_decode import make_hf_checkpoints

  from kptjax import convert
  from kptjax.data import pipeline, tokenizer
  from kptjax.models import factory
  from kptjax.training import preflight
  config = bench_config(name)
  mesh = _one_device_mesh()
  with tempfile.TemporaryDirectory() as tmp:
    vit_dir, llm_dir = make_hf_checkpoints(config.model, tmp)
    with config.unlocked():
      config.checkpoints.vit_dir, config.checkpoints.llm_dir = vit_dir, llm_dir
    model_config, params = convert.load_vlm(config)
    config = preflight.with_model_config(config, model_config)
    host_params = jax.tree.map(np.asarray, jax.device_get(params))
    del params
    it = iter(pipeline.make_train_dataset(config, tokenizer.load_tokenizer("")))
    batch = {k: v for k, v in next(it).items() if k in factory.BATCH_KEYS}
    tokens = float(batch["input_mask"].sum())
    b = config.train.batch_size
    positions = logit_positions(config, batch["loss_mask"])
    flops = dict(analytic=analytic_flops(config, b),
                 analytic_without_attention=analytic_flops(config, b, attention=False),
                 logit_positions=positions,
                 analytic_kptjax=analytic_flops(config, b, logit_positions=positions),
                 xla=xla_flops(config, mesh))
    fns, losses = {}, {}
    for overrides in [f"remat_policy={config.model.remat_policy}"] + variants.split(";"):
      impl = "kptjax " + overrides
      variant = model_variant(config, overrides)
      fns[impl], losses[impl] = _kptjax_runner(variant, mesh, batch, host_params)
    if run_torch:
      import torch
      torch.set_num_threads(os.cpu_count() or 1)
      ref = TorchTrainer(vit_dir, llm_dir, host_params, config)
      losses["torch+peft"] = ref.step(batch)
      flops["torch_flop_counter"] = ref.count_flops(batch)
      fns["torch+peft"] = lambda n: [ref.step(batch) for _ in range(n)]
    secs = _time_rounds(fns, steps, rounds)
  row_flops = {impl: flops["analytic" if impl == "torch+peft" else "analytic_kptjax"]
               for impl in secs}
  return _rows(name, secs, losses, tokens, row_flops, peak), dict(config=name, **flops)


def bench_demo(steps: int, rounds: int, peak: float,
               variants: str = DEMO_VARIANTS) -> tuple[list[dict], dict]:
  """configs/demo.py recipes (``variants``: ';'-separated config args, the first the
  reference), one batch each, kptjax; per row its step time relative to the reference and
  its run's training time on a machine that runs the reference step in 0.92 s."""
  from configs import demo
  from kptjax.models import factory
  from kptjax.training import trainer as trainer_lib
  import jax

  from kptjax import sharding
  from kptjax.demo import DEMO_CPU_DEVICES
  demo_mesh = sharding.make_mesh(demo.get_config().mesh, jax.devices()[:DEMO_CPU_DEVICES])
  fns, losses, flops, num_steps, tokens = {}, {}, {}, {}, {}
  for arg in variants.split(";"):
    impl = "demo:" + arg if arg else "demo (default)"
    config = demo.get_config(arg or None).unlock()
    it = iter(trainer_lib.make_dataset(config))
    batch = {k: v for k, v in next(it).items() if k in factory.BATCH_KEYS}
    tokens[impl] = float(batch["input_mask"].sum())
    fns[impl], losses[impl] = _kptjax_runner(config, demo_mesh, batch)
    flops[impl] = analytic_flops(config, config.train.batch_size)
    num_steps[impl] = config.train.num_steps
  secs = _time_rounds(fns, steps, rounds)
  rows = []
  for impl, sec in secs.items():
    rows += _rows("demo", {impl: sec}, losses, tokens[impl], flops, peak)
  base = next(iter(secs.values()))
  for row, (impl, sec) in zip(rows, secs.items()):
    row["vs_first"] = sec / base
    row["steps"] = num_steps[impl]
    row[f"run_compute_s_at_{REFERENCE_STEP_S}s_per_reference_step"] = (
        REFERENCE_STEP_S * sec / base * row["steps"])
  return rows, dict(config="demo", analytic=flops[next(iter(secs))])


# ------------------------------------------------------------------------------- main
def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--configs", default="tiny,demo,small")
  parser.add_argument("--steps", type=int, default=3, help="timed steps per row and round")
  parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
  parser.add_argument("--no_torch", action="store_true")
  parser.add_argument("--aot_configs", default=",".join(aot_memory.PAPER_CONFIGS),
                      help="paper configs whose step is AOT-compiled ('none' skips)")
  parser.add_argument("--aot_devices", default="8,16,64")
  parser.add_argument("--demo_variants", default=DEMO_VARIANTS,
                      help="configs/demo.py args timed by --configs demo, ';' separated, "
                           "the first the reference ('' = the default recipe)")
  parser.add_argument("--kptjax_variants", default=KPTJAX_VARIANTS,
                      help="kptjax rows of tiny and small after the one as configured: "
                           "';'-separated config.model overrides (key=value,...)")
  parser.add_argument("--out", default="experiments/results/bench_train")
  parser.add_argument("--xla_default", action="store_true",
                      help="run XLA's own CPU defaults, not kptjax.xla_cpu's flags and "
                           "process settings (which the mains set): the comparison")
  args = parser.parse_args()
  if not args.xla_default:   # before jax starts, as the mains do (the demo's 2 devices)
    from kptjax.demo import DEMO_CPU_DEVICES
    xla_cpu.configure(devices=DEMO_CPU_DEVICES if "demo" in args.configs else None)
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)

  import jax

  from kptjax.evaluation.metrics import markdown_table
  rows, flop_rows = [], []
  for name in args.configs.split(","):
    dtype = "float32" if name == "demo" else bench_config(name).model.dtype
    peak = matmul_peak(dtype)
    print(f"{name}: matmul peak {peak / 1e9:.1f} GFLOP/s ({dtype}) on "
          f"{jax.devices()[0].device_kind}", flush=True)
    if name == "demo":
      r, f = bench_demo(args.steps, args.rounds, peak, args.demo_variants)
    else:
      r, f = bench_one(name, args.steps, args.rounds, peak, not args.no_torch,
                       args.kptjax_variants)
    rows += r
    flop_rows.append(f)
    print(markdown_table(r, digits=4), flush=True)
  os.makedirs(args.out, exist_ok=True)
  for fname, table in (("bench_train.csv", rows), ("bench_train_flops.csv", flop_rows)):
    with open(os.path.join(args.out, fname), "w", newline="") as f:
      keys = sorted({k for r in table for k in r}, key=lambda k: (k != "config", k))
      writer = csv.DictWriter(f, fieldnames=keys)
      writer.writeheader()
      writer.writerows(table)
  text = (f"## Train step on {jax.devices()[0].device_kind} (interleaved, median of "
          f"{args.rounds} rounds)\n\n" + markdown_table(rows, digits=4)
          + "\n\n## FLOPs of one step\n\n" + markdown_table(flop_rows, digits=4))
  if args.aot_configs != "none":
    mem = aot_memory.run(args.aot_configs.split(","),
                         [int(d) for d in args.aot_devices.split(",")])
    text += "\n\n" + aot_memory.write(mem, args.out)
  with open(os.path.join(args.out, "bench_train.md"), "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
