r"""Per-device memory of the paper configs' train step, compiled ahead of time.

    python experiments/aot_memory.py --out experiments/results/aot_memory
    python experiments/aot_memory.py --configs locllm_coco --devices 8 \
        --remat nothing_saveable,dots_saveable,checkpoint_dots_with_no_batch_dims,none

For every config x device count x remat policy, a subprocess with that many simulated
CPU devices (``--xla_force_host_platform_device_count``) builds the train step of
``configs/<name>.py`` on a mesh data=1, fsdp=N, tensor=1 from ``jax.eval_shape``
abstract params (nothing of the 7B is allocated), lowers and compiles it, and reads
``compiled.memory_analysis()``: arguments (params + optimizer state + batch shard),
outputs, aliased (the donated state), temporaries (activations, gathered weights,
gradients), and peak = arguments + outputs - aliased + temporaries, in GiB per device.
The global batch is the config's (raised to N where N does not divide it) and
``optim.grad_accum_steps`` is 1. The CPU compiler's buffer assignment is not a GPU/TPU
one: read the numbers as an estimate of what a device must hold, and their ratios
across N as what the sharding divides.

``--decode`` adds the decode program (``kptjax.inference.generate.program``, what
``Decoder.shared`` runs) of each config on the same mesh: ``--persons`` persons
(default 8 x N) split over the devices, the 17 COCO keypoint questions of 64 tokens per
person sharing a 300-token image prefix, ``decode.max_new_tokens`` new tokens, the
weights sharded by the training rules and stored in ``model.param_dtype``, the KV cache
in ``model.dtype``; rows ``program='decode'``.

Writes ``aot_memory.csv`` and ``aot_memory.md`` to --out and prints the table;
``experiments/bench_train.py`` calls ``run`` for its memory section.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PAPER_CONFIGS = ("locllm_coco", "posellm_coco", "capellm_mp100", "kptllm_mp100")
DECODE = "<decode>"   # the job name of the decode program (``measure_decode``)
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "checkpoint_dots_with_no_batch_dims",
                  "none")
GIB = 1024 ** 3


def load_config(name: str):
  """'locllm_coco' or 'locllm_coco:accum=8' -> the locked ConfigDict of configs/<name>.py."""
  module, _, arg = name.partition(":")
  return importlib.import_module(f"configs.{module}").get_config(arg or None)


def memory_fields(mem, compile_s: float) -> dict:
  """Per-device GiB of a ``compiled.memory_analysis()``, with peak = arguments + outputs
  - aliased + temporaries, and the compile time."""
  row = dict(argument_gib=mem.argument_size_in_bytes / GIB,
             output_gib=mem.output_size_in_bytes / GIB,
             alias_gib=mem.alias_size_in_bytes / GIB,
             temp_gib=mem.temp_size_in_bytes / GIB, compile_s=compile_s)
  row["peak_gib"] = row["argument_gib"] + row["output_gib"] - row["alias_gib"] + row["temp_gib"]
  return row


def measure(name: str, remat: str = "", batch: int = 0) -> dict:
  """Compiles the train step of config ``name`` over all (simulated) devices with FSDP
  over them; returns its per-device memory in GiB (see the module docstring)."""
  import jax

  from kptjax import sharding
  from kptjax.models import factory
  from kptjax.training import trainer as trainer_lib

  config = load_config(name)
  n = jax.device_count()
  with config.unlocked():
    config.mesh.shape.update(data=1, fsdp=n, tensor=1)
    config.optim.grad_accum_steps = 1
    if remat:
      config.model.remat_policy = remat
    b = batch or config.train.batch_size
    config.train.batch_size = b if b % n == 0 else n * -(-b // n)
  trainer = trainer_lib.build(config, sharding.make_mesh(config.mesh))
  state = trainer_lib.abstract_state(trainer)
  start = time.perf_counter()
  compiled = trainer.step.lower(state, factory.abstract_batch(config, trainer.mesh)).compile()
  size = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  return dict(config=name, program="train", devices=n, remat=config.model.remat_policy,
              global_batch=config.train.batch_size, seq_len=config.data.max_len,
              loss_chunk=config.train.get("loss_chunk", 0),
              params_gib_total=size(state.params) / GIB,
              opt_state_gib_total=size(state.opt_state) / GIB,
              **memory_fields(compiled.memory_analysis(), time.perf_counter() - start))


def measure_decode(name: str, persons: int = 0, queries: int = 17, query_len: int = 64,
                   prefix_len: int = 300) -> dict:
  """Compiles the decode program of config ``name`` on data=1, fsdp=N (all devices):
  per-device memory in GiB (module docstring)."""
  # jax is imported here, in the worker, after its XLA_FLAGS chose the device count.
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from kptjax import sharding
  from kptjax.inference import generate
  from kptjax.models import factory, layers, vlm

  config = load_config(name)
  n = jax.device_count()
  with config.unlocked():
    config.mesh.shape.update(data=1, fsdp=n, tensor=1)
  mesh = sharding.make_mesh(config.mesh)
  model = factory.make_model(config)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *vlm.dummy_inputs(config.model),
                                            **factory.init_kwargs(config)))["params"]
  shardings = sharding.logical_shardings(boxed, mesh, sharding.logical_rules(config.mesh))
  dtype = layers.to_dtype(config.model.param_dtype)
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, dtype, sharding=s),
                        nn.unbox(boxed), shardings)
  p = persons or 8 * n
  rows_sh = sharding.batch_sharding(mesh)
  side = config.model.vit.image_size
  images = jax.ShapeDtypeStruct((p, side, side, 3), jnp.float32, sharding=rows_sh)
  rows = jax.ShapeDtypeStruct((p * queries, query_len), jnp.int32, sharding=rows_sh)
  lengths = jax.ShapeDtypeStruct((p * queries,), jnp.int32, sharding=rows_sh)
  prefix = jax.ShapeDtypeStruct((prefix_len,), jnp.int32)
  fn = generate.program(model, max_new_tokens=int(config.decode.max_new_tokens), eos_id=2,
                        cache_dtype=layers.to_dtype(config.model.dtype), mesh=mesh)
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = fn.lower(params, images, rows, lengths, prefix, None, None).compile()
  return dict(config=name, program="decode", devices=n, remat="-", global_batch=p,
              seq_len=prefix_len + query_len + int(config.decode.max_new_tokens), loss_chunk=0,
              params_gib_total=sum(x.size * x.dtype.itemsize
                                   for x in jax.tree.leaves(params)) / GIB,
              opt_state_gib_total=0.0,
              **memory_fields(compiled.memory_analysis(), time.perf_counter() - start))


def _in_subprocess(devices: int, jobs: list[tuple[str, str]], batch: int) -> list[dict]:
  """Runs ``measure`` for each (config, remat) job in one process with ``devices`` devices."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  proc = subprocess.run(
      [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(jobs),
       "--batch", str(batch)], env=env, cwd=ROOT, capture_output=True, text=True,
      timeout=7200)
  if proc.returncode:
    raise RuntimeError(f"AOT compile on {devices} devices failed:\n{proc.stderr[-4000:]}")
  return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def run(configs=PAPER_CONFIGS, devices=(8, 16, 64), remats=("",), batch: int = 0,
        verbose: bool = True) -> list[dict]:
  """Rows of ``measure`` for every config x devices x remat ('' = the config's policy)."""
  rows = []
  for n in devices:
    for row in _in_subprocess(n, [(c, r) for c in configs for r in remats], batch):
      if verbose:
        print(f"  {row['config']} on {n}: remat={row['remat']} peak {row['peak_gib']:.2f} "
              f"GiB (temp {row['temp_gib']:.2f}), compiled in {row['compile_s']:.0f} s",
              flush=True)
      rows.append(row)
  return rows


def markdown(rows: list[dict]) -> str:
  from kptjax.evaluation.metrics import markdown_table
  keys = ("config", "program", "devices", "remat", "global_batch", "seq_len", "argument_gib",
          "temp_gib", "output_gib", "alias_gib", "peak_gib", "compile_s")
  return markdown_table([{k: r[k] for k in keys} for r in rows], digits=3)


def write(rows: list[dict], out: str) -> str:
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "aot_memory.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  text = ("## Train step (and decode program) AOT-compiled on simulated CPU devices (data=1, fsdp=N; GiB per "
          "device from memory_analysis)\n\n" + markdown(rows))
  with open(os.path.join(out, "aot_memory.md"), "w") as f:
    f.write(text)
  return text


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--configs", default=",".join(PAPER_CONFIGS))
  parser.add_argument("--devices", default="8,16,64")
  parser.add_argument("--remat", default="",
                      help="comma-separated jax.checkpoint_policies names ('' = the config's)")
  parser.add_argument("--batch", type=int, default=0, help="global batch (0 = the config's)")
  parser.add_argument("--decode", action="store_true",
                      help="also the decode program (--batch: persons, default 8 x N)")
  parser.add_argument("--out", default="experiments/results/aot_memory")
  parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    for name, remat in json.loads(args.worker):
      row = measure_decode(name, args.batch) if remat == DECODE else \
          measure(name, remat, args.batch)
      print(json.dumps(row), flush=True)
    return
  remats = args.remat.split(",") if args.remat else ("",)
  rows = run(args.configs.split(","), [int(d) for d in args.devices.split(",")],
             remats + ((DECODE,) if args.decode else ()), args.batch)
  print(write(rows, args.out))


if __name__ == "__main__":
  main()
