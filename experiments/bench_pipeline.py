r"""Input pipeline throughput on the synthetic data: examples/s with 0 and 2 worker processes.

    python experiments/bench_pipeline.py --config configs/tiny.py --image_size 224 \
        --patch_size 14 --max_len 1024 --batch_size 32 --workers 0,2 \
        --out experiments/results/bench_pipeline
    # the demo's own pipeline, with and without its decoded-image cache:
    python experiments/bench_pipeline.py --config configs/demo.py --image_size 0 \
        --max_len 0 --num_images 4000 --workers 0 --image_cache_mb 0,256 --warmup 150 \
        --batches 100 --rounds 3 --out experiments/results/bench_pipeline_demo

For each setting (worker count x ``data.image_cache_mb``), builds
``kptjax.data.pipeline.make_train_dataset`` (synthetic 'easy' images, generated once and
cached, the config's conversations, the bundled tokenizer), pulls ``--warmup`` batches
(worker start-up, first reads, cache filling) and then times ``--batches`` batches; the
settings are timed interleaved, ``--rounds`` times, median. ``cpu_ms_per_batch`` is this
process's CPU time (its read threads; not worker processes'): what the pipeline takes
from a training step that shares the cores. Prints a Markdown table and writes
``bench_pipeline.csv`` and ``bench_pipeline.md`` to ``--out``.

Runs under ``absl.app.run`` because grain's worker processes need absl flags parsed.
"""

from __future__ import annotations

import csv
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import numpy as np  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Crop side (model.vit.image_size); "
                                   "0 keeps the config's.")
_PATCH = flags.DEFINE_integer("patch_size", 14, "Patch size (sets the image token count).")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Examples per batch.")
_MAX_LEN = flags.DEFINE_integer("max_len", 1024, "Sequence length (data.max_len); 0 keeps "
                                "the config's.")
_BATCHES = flags.DEFINE_integer("batches", 10, "Timed batches per setting.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed batches first (worker start-up).")
_WORKERS = flags.DEFINE_list("workers", ["0", "2"], "Worker process counts to compare.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 256, "Synthetic training images.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "Synthetic data root ('' = default cache).")
_CACHE = flags.DEFINE_list("image_cache_mb", ["0"], "data.image_cache_mb values to compare.")
_ROUNDS = flags.DEFINE_integer("rounds", 1, "Interleaved rounds of every setting (median).")
_OUT = flags.DEFINE_string("out", "experiments/results/bench_pipeline", "Output folder.")


def _config(workers: int, cache_mb: int = 0):
  c = _CONFIG.value.copy_and_resolve_references()
  c.data.image_cache_mb = cache_mb
  if _IMAGE_SIZE.value:
    c.model.vit.image_size = _IMAGE_SIZE.value
    c.model.vit.patch_size = _PATCH.value
  c.train.batch_size = _BATCH.value
  if _MAX_LEN.value:
    c.data.max_len = _MAX_LEN.value
  c.data.num_workers = workers
  c.data.train.num_images = _NUM_IMAGES.value
  if _DATA_DIR.value:
    c.data.train.path = _DATA_DIR.value
  return c


def main(argv):
  del argv
  from kptjax.data import pipeline  # pylint: disable=g-import-not-at-top
  from kptjax.data.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
  tokenizer = load_tokenizer(_CONFIG.value.checkpoints.tokenizer_dir)
  t0 = time.perf_counter()
  records = pipeline.load_records(_config(0), "train")
  print(f"{len(records)} synthetic people ready in {time.perf_counter() - t0:.1f} s")
  settings = [(int(w), int(m)) for w in _WORKERS.value for m in _CACHE.value]
  runs = {k: [] for k in settings}
  for _ in range(_ROUNDS.value):
    for workers, cache_mb in settings:
      config = _config(workers, cache_mb)
      ds = pipeline.make_train_dataset(config, tokenizer, records=records)
      start = time.perf_counter()
      it = iter(ds)
      for _ in range(_WARMUP.value):
        batch = next(it)
      first = time.perf_counter() - start
      start, cpu = time.perf_counter(), time.process_time()
      for _ in range(_BATCHES.value):
        batch = next(it)
      elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
      runs[(workers, cache_mb)].append((first, elapsed, cpu, batch["tokens"].shape[1]))
      it.close()   # stops worker processes
  rows = []
  for (workers, cache_mb), times in runs.items():
    first, elapsed, cpu = (float(np.median([t[i] for t in times])) for i in range(3))
    rows.append(dict(
        workers=workers, image_cache_mb=cache_mb, image_size=config.model.vit.image_size,
        seq_len=times[0][3], batch_size=config.train.batch_size, batches=_BATCHES.value,
        rounds=len(times), warmup_s=round(first, 2),
        examples_per_s=round(_BATCHES.value * config.train.batch_size / elapsed, 1),
        cpu_ms_per_batch=round(1e3 * cpu / _BATCHES.value, 1)))
  header = "| " + " | ".join(rows[0]) + " |"
  lines = [header, "|" + "---|" * len(rows[0])]
  lines += ["| " + " | ".join(str(v) for v in r.values()) + " |" for r in rows]
  table = "\n".join(lines)
  print(f"\nPipeline throughput ({os.cpu_count()} CPUs, template "
        f"{_CONFIG.value.data.template}, synthetic easy):\n\n{table}\n")
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, "bench_pipeline.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  with open(os.path.join(_OUT.value, "bench_pipeline.md"), "w") as f:
    f.write(table + "\n")


if __name__ == "__main__":
  app.run(main)
