r"""Train-step speed: kptjax vs a torch reference on the same weights and batch, plus the
per-device memory of the LocLLM-7B step under FSDP (AOT, nothing allocated).

    python experiments/bench_train.py --out experiments/results/bench_train

For ``tiny`` (configs/tiny.py:lora) and ``small`` (the same recipe at a few times the
width, defined here), both sides get the same random Hugging Face checkpoints (DINOv2 +
Llama written to a temp dir, as experiments/bench_decode.py makes them), the same
projector and LoRA factors, and one batch of the real pipeline; they train LoRA +
projector with AdamW, clipping and the masked token loss:

  kptjax   ``kptjax.train.build`` step (jit, donated state, scanned + rematerialized layers)
  torch    transformers ``Dinov2Model`` -> ``nn.Linear`` projector -> ``LlamaForCausalLM``
           with a hand-written LoRA on q/v of both towers (peft is not a dependency)

Reported per row: step time, tokens/s (non-padding tokens), achieved model FLOP/s
(``model_flops``: XLA's count of forward + backward of the step, without remat
recompute, the same number for every row) and that as a fraction of the measured matmul
peak (a large ``jnp.dot`` in the step's compute dtype), the first-step loss of each side
(equal up to float error: the same model), and the step time relative to kptjax's. The
kptjax step is timed as configured (layers rematerialized: 'nothing_saveable') and with
``remat_policy='none'`` (what torch does: keep activations). LoRA dropout is 0 on both
sides so that the losses compare.

Then, in a subprocess on 8 simulated CPU devices, the ``configs/locllm_coco.py`` step
(global batch 64, and the same with 8 accumulation micro-batches) is lowered from
``jax.eval_shape`` abstract params (never allocating 7B) on a mesh data=1, fsdp=8,
tensor=1 and compiled; ``compiled.memory_analysis()`` gives the bytes per device
(arguments = params + optimizer state + batch shard, temporaries, outputs; peak =
arguments + outputs - aliased + temporaries). The CPU compiler's buffer assignment is
not a GPU/TPU one: read the numbers as an estimate of what a device must hold.

Writes ``bench_train.csv``, ``bench_train_memory.csv`` and ``bench_train.md`` to --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))


# ---------------------------------------------------------------------------- configs
def bench_config(name: str):
  """'tiny' = configs/tiny.py:lora; 'small' = its recipe with wider, deeper towers."""
  from configs import tiny
  config = tiny.get_config("lora")
  with config.unlocked():
    config.model.lora.dropout = 0.0
    config.mesh.shape.data = 1
    if name == "small":
      v, l = config.model.vit, config.model.llm
      v.update(image_size=112, patch_size=14, hidden_size=384, num_layers=6, num_heads=6,
               intermediate_size=1536)
      l.update(hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8,
               num_kv_heads=8, head_dim=64)
      config.model.lora.rank = 8
      config.model.lora.alpha = 16.0
      config.train.batch_size = 8
      config.data.max_len = 384
    elif name != "tiny":
      raise ValueError(f"unknown bench config {name!r}")
  return config


# ------------------------------------------------------------------------ torch side
class TorchLoRA:
  """``y = linear(x) + (x @ A) @ B * scale`` around an existing ``nn.Linear``."""

  def __init__(self, linear, a: np.ndarray, b: np.ndarray, scale: float):
    import torch
    self.torch = torch
    self.linear = linear
    self.a = torch.nn.Parameter(torch.from_numpy(np.array(a, np.float32)))
    self.b = torch.nn.Parameter(torch.from_numpy(np.array(b, np.float32)))
    self.scale = scale
    linear.register_forward_hook(self._hook)

  def _hook(self, module, inputs, output):
    del module
    return output + (inputs[0] @ self.a) @ self.b * self.scale


class TorchTrainer:
  """The LoRA + projector train step in transformers' torch modules (float32)."""

  def __init__(self, vit_dir: str, llm_dir: str, params: dict, config: Any):
    import torch
    import transformers
    self.torch = torch
    self.vit = transformers.Dinov2Model.from_pretrained(vit_dir).train()
    self.llm = transformers.LlamaForCausalLM.from_pretrained(llm_dir).train()
    for p in list(self.vit.parameters()) + list(self.llm.parameters()):
      p.requires_grad_(False)
    lora = config.model.lora
    scale = lora.alpha / lora.rank
    self.loras = []
    tower_layers = (
        ("vit", self.vit.encoder.layer, lambda m: m.attention, ("query", "q_proj"),
         ("value", "v_proj"), params["vit"]["layers"]["attention"]),
        ("llm", self.llm.model.layers, lambda m: m.self_attn, ("q_proj", "q_proj"),
         ("v_proj", "v_proj"), params["llm"]["layers"]["self_attn"]))
    for _, layers, attn, q, v, jax_attn in tower_layers:
      for i, layer in enumerate(layers):
        for kname, tname in (q, v):
          leaf = jax_attn[kname]
          self.loras.append(TorchLoRA(getattr(attn(layer), tname), leaf["lora_a"][i],
                                      leaf["lora_b"][i], scale))
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
    decay = [p for p in self.projector.parameters() if p.ndim >= 2]
    decay += [t for l in self.loras for t in (l.a, l.b)]
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


# ----------------------------------------------------------------------------- timing
def matmul_peak(dtype: str) -> float:
  """Measured FLOP/s of a large square matmul on the default device."""
  import jax
  import jax.numpy as jnp
  n = 1024 if jax.devices()[0].platform == "cpu" else 8192
  x = jnp.ones((n, n), dtype)
  f = jax.jit(lambda a: a @ a)
  jax.block_until_ready(f(x))
  reps = 5 if jax.devices()[0].platform == "cpu" else 50
  start = time.perf_counter()
  for _ in range(reps):
    out = f(x)
  jax.block_until_ready(out)
  return 2 * n ** 3 * reps / (time.perf_counter() - start)


def model_flops(config: Any, mesh: Any) -> float:
  """FLOPs of one train step as the model defines it: forward + backward, no remat
  recompute. Counted by XLA on the lowered step of the same config with unrolled layers
  (the cost analysis counts a scanned layer's loop body once, not once per layer)."""
  from kptjax import train
  with config.unlocked():
    config.model.scan_layers, config.model.remat_policy = False, "none"
  trainer = train.build(config, mesh)
  cost = trainer.step.lower(train.abstract_state(trainer),
                            train.abstract_batch(config, mesh)).cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost["flops"])


def bench_one(name: str, steps: int, peak: float, run_torch: bool) -> list[dict]:
  import jax
  from bench_decode import make_hf_checkpoints
  from kptjax import convert, sharding, train
  from kptjax.data import pipeline, tokenizer

  config = bench_config(name)
  mesh = jax.make_mesh((1, 1, 1), sharding.MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=jax.devices()[:1])
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    vit_dir, llm_dir = make_hf_checkpoints(config.model, tmp)
    with config.unlocked():
      config.checkpoints.vit_dir, config.checkpoints.llm_dir = vit_dir, llm_dir
    model_config, params = convert.load_vlm(config)
    config = train.with_model_config(config, model_config)
    host_params = jax.tree.map(np.asarray, jax.device_get(params))
    del params
    it = iter(pipeline.make_train_dataset(config, tokenizer.load_tokenizer("")))
    batch = {k: v for k, v in next(it).items() if k in train.BATCH_KEYS}
    tokens = float(batch["input_mask"].sum())

    flops = model_flops(train.with_model_config(config, config.model), mesh)
    device_batch = sharding.shard_batch(batch, mesh)
    jax_sec = None
    for impl, remat in (("kptjax", config.model.remat_policy), ("kptjax remat=none", "none")):
      variant = train.with_model_config(config, config.model)
      with variant.unlocked():
        variant.model.remat_policy = remat
      trainer = train.build(variant, mesh)
      state = train.init_state(trainer, variant, params=host_params)
      compiled = trainer.step.lower(state, device_batch).compile()
      state, metrics = compiled(state, device_batch)
      loss1 = float(metrics["loss"])
      start = time.perf_counter()
      for _ in range(steps):
        state, metrics = compiled(state, device_batch)
      jax.block_until_ready(metrics)
      sec = (time.perf_counter() - start) / steps
      jax_sec = jax_sec or sec
      rows.append(dict(config=name, impl=impl, step_ms=1e3 * sec, tokens_per_s=tokens / sec,
                       model_tflops_per_s=flops / sec / 1e12, frac_of_peak=flops / sec / peak,
                       loss_step1=loss1, vs_kptjax=sec / jax_sec))
      del state, compiled
    if run_torch:
      import torch
      torch.set_num_threads(os.cpu_count() or 1)
      ref = TorchTrainer(vit_dir, llm_dir, host_params, config)
      t_loss1 = ref.step(batch)
      start = time.perf_counter()
      for _ in range(steps):
        ref.step(batch)
      t_sec = (time.perf_counter() - start) / steps
      rows.append(dict(config=name, impl="torch", step_ms=1e3 * t_sec,
                       tokens_per_s=tokens / t_sec, model_tflops_per_s=flops / t_sec / 1e12,
                       frac_of_peak=flops / t_sec / peak, loss_step1=t_loss1,
                       vs_kptjax=t_sec / jax_sec))
  return rows


# ---------------------------------------------------------------------- AOT memory
def aot_memory(config_path: str) -> dict:
  """Lowers and compiles the train step of ``config_path`` on all (simulated) devices
  with FSDP over them, from abstract params; returns per-device bytes."""
  import importlib.util

  import jax
  from kptjax import sharding, train

  path, _, arg = config_path.partition(":")
  spec = importlib.util.spec_from_file_location("aot_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  n = jax.device_count()
  with config.unlocked():
    config.mesh.shape.update(data=1, fsdp=n, tensor=1)
  trainer = train.build(config, sharding.make_mesh(config.mesh))
  state = train.abstract_state(trainer)
  batch = train.abstract_batch(config, trainer.mesh)
  b, t = config.train.batch_size, config.data.max_len
  start = time.perf_counter()
  compiled = trainer.step.lower(state, batch).compile()
  mem = compiled.memory_analysis()
  gib = 1024 ** 3
  params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.params))
  opt = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.opt_state))
  out = dict(config=config_path, devices=n, mesh="data=1 fsdp=%d tensor=1" % n,
             global_batch=b, seq_len=t, params_gib_total=params / gib,
             opt_state_gib_total=opt / gib,
             argument_gib_per_device=mem.argument_size_in_bytes / gib,
             temp_gib_per_device=mem.temp_size_in_bytes / gib,
             output_gib_per_device=mem.output_size_in_bytes / gib,
             alias_gib_per_device=mem.alias_size_in_bytes / gib,
             compile_s=time.perf_counter() - start)
  out["peak_gib_per_device"] = (out["argument_gib_per_device"] + out["output_gib_per_device"]
                                - out["alias_gib_per_device"] + out["temp_gib_per_device"])
  return out


def _aot_in_subprocess(config_path: str, devices: int) -> dict:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--aot_only", config_path],
                        env=env, cwd=ROOT, capture_output=True, text=True, timeout=3600)
  if proc.returncode:
    raise RuntimeError(f"AOT compile failed:\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------- main
def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--configs", default="tiny,small")
  parser.add_argument("--steps", type=int, default=5, help="timed steps per row")
  parser.add_argument("--no_torch", action="store_true")
  parser.add_argument("--aot_config", action="append",
                      help="config[:arg] whose step is AOT-compiled (repeatable; default: "
                      "locllm_coco.py and locllm_coco.py:accum=8; 'none' skips)")
  parser.add_argument("--aot_devices", type=int, default=8)
  parser.add_argument("--aot_only", default="", help=argparse.SUPPRESS)
  parser.add_argument("--out", default="experiments/results/bench_train")
  args = parser.parse_args()
  if args.aot_only:
    print(json.dumps(aot_memory(args.aot_only)))
    return

  import jax
  from kptjax.metrics import markdown_table
  rows = []
  for name in args.configs.split(","):
    dtype = bench_config(name).model.dtype
    peak = matmul_peak(dtype)
    print(f"{name}: matmul peak {peak / 1e12:.3f} TFLOP/s ({dtype}) on "
          f"{jax.devices()[0].device_kind}", flush=True)
    rows += bench_one(name, args.steps, peak, not args.no_torch)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "bench_train.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  text = f"## Train step on {jax.devices()[0].device_kind}\n\n" + markdown_table(rows, digits=4)
  aot = args.aot_config or ["configs/locllm_coco.py", "configs/locllm_coco.py:accum=8"]
  aot = [a for a in aot if a and a != "none"]
  if aot:
    mems = [_aot_in_subprocess(a, args.aot_devices) for a in aot]
    with open(os.path.join(args.out, "bench_train_memory.csv"), "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=list(mems[0]))
      writer.writeheader()
      writer.writerows(mems)
    text += (f"\n## Train step AOT-compiled on {args.aot_devices} simulated CPU devices "
             "(FSDP; GiB per device from memory_analysis)\n\n" + markdown_table(mems, digits=3))
  with open(os.path.join(args.out, "bench_train.md"), "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
