r"""Evaluation sweep: checkpoints x datasets x decoding options -> one CSV + one Markdown table.

    python experiments/eval_sweep.py --config configs/tiny.py \
        --checkpoints runs/a,runs/b \
        --dataset 'coco:coco,ann_file=/data/coco/val.json,image_root=/data/coco/val2017' \
        --dataset 'mpii:mpii,json_file=/data/mpii/valid.json,image_root=/data/mpii/images' \
        --decode 'constrained=False' --decode 'constrained=True,share_prefix=False' \
        --out results/sweep

Every cell is one ``kptjax.evaluation.runner.run`` writing
``OUT/<checkpoint label>-<hash of its absolute path>/<dataset>/<decode>/``
(``predictions.json`` + its provenance sidecar + ``metrics.json``); a cell whose files
were made with the same provenance (checkpoint path and step, configs, dataset files) is
read, not recomputed, so an interrupted sweep continues where it stopped (and a half-done
cell resumes from its partial predictions); a cell made otherwise is recomputed. A
checkpoint whose cells are all reusable is not even loaded. Each checkpoint is evaluated
at the step that is its latest when the sweep reaches it (every cell the same step).

Checkpoint labels are the shortest trailing part of the paths that tells them apart
(``runs/a/checkpoints`` and ``runs/b/checkpoints`` are ``a/checkpoints`` and
``b/checkpoints``); the ``step`` column is the checkpoint step evaluated.
``--dataset`` is ``[label:]source,key=value,...`` as evaluate's ``--dataset`` (an
empty source means ``config.data.eval``); ``--decode`` overrides ``config.decode`` fields;
``--checkpoints ''`` evaluates the config's own weights (Hugging Face dirs or random).

Writes ``OUT/sweep.csv`` and ``OUT/sweep.md`` (one row per cell) and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import io
import json
import os
import re
import sys
from typing import Any, Optional, Sequence

import ml_collections

from kptjax import errors, storage
from kptjax.data.sources.catalog import parse_options
from kptjax.evaluation import loading, runner
from kptjax.evaluation.metrics import markdown_table

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

COLUMNS = ("checkpoint", "step", "dataset", "decode", "persons", "parse_failures",
           "missing_keypoints", "image_errors", "AP", "AP50", "AR",
           "PCK@0.05", "PCK@0.1", "PCK@0.2", "PCKh@0.5", "PCKh@0.1", "MPJPE", "PA-MPJPE",
           "persons_per_s")


def load_config(spec: str) -> Any:
  """'configs/tiny.py[:arg]' -> the locked ConfigDict of its ``get_config(arg)``."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("sweep_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def _slug(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_") or "default"


def checkpoint_labels(checkpoints: Sequence[str]) -> list[str]:
  """Distinct labels for distinct checkpoint paths: the fewest trailing path components
  that tell each absolute path apart from the others ('' -> 'config-weights')."""
  parts = [os.path.abspath(c.rstrip("/")).strip("/").split("/") if c else [] for c in checkpoints]
  labels = []
  for i, p in enumerate(parts):
    if not p:
      labels.append("config-weights")
      continue
    others = {tuple(q) for j, q in enumerate(parts) if j != i and q != p}
    n = 1
    while n < len(p) and any(tuple(q[-n:]) == tuple(p[-n:]) for q in others):
      n += 1
    labels.append("/".join(p[-n:]))
  return labels


def cell_dir_name(checkpoint: str, label: str) -> str:
  """The checkpoint's folder under OUT: its label and a hash of its absolute path (two
  checkpoints never share a folder, whatever their labels)."""
  if not checkpoint:
    return label
  digest = hashlib.sha256(os.path.abspath(checkpoint.rstrip("/")).encode()).hexdigest()[:8]
  return f"{_slug(label)}-{digest}"


def parse_dataset(text: str) -> tuple[str, str]:
  """'[label:]source,k=v,...' -> (label, evaluate's --dataset string)."""
  label, sep, rest = text.partition(":")
  if not sep or "," in label or "=" in label:
    label, rest = "", text
  source = rest.split(",", 1)[0].strip()
  return _slug(label or source or "config"), rest


def parse_decode(text: str) -> dict[str, Any]:
  """'constrained=True,max_new_tokens=20' -> {'constrained': True, 'max_new_tokens': 20}."""
  return parse_options(text)


def with_decode(config: Any, overrides: dict[str, Any]) -> Any:
  """A copy of ``config`` with ``config.decode`` fields overridden."""
  c = ml_collections.ConfigDict(config.to_dict())
  for key, value in overrides.items():
    if key not in c.decode:
      raise errors.ConfigError(f"--decode: unknown config.decode field '{key}'; known: "
                               f"{sorted(c.decode.keys())}")
    c.decode[key] = type(c.decode[key])(value)
  return c.lock()


def row_of(checkpoint: str, dataset: str, decode_label: str, m: dict[str, Any]) -> dict:
  """One table row from a cell's metrics.json."""
  row = {"checkpoint": checkpoint, "step": m.get("checkpoint_step"), "dataset": dataset,
         "decode": decode_label, "persons": m.get("num_persons"),
         "parse_failures": m.get("parse_failures"),
         "missing_keypoints": m.get("missing_keypoints"), "image_errors": m.get("image_errors"),
         "persons_per_s": m.get("persons_per_s")}
  for group in ("coco", "pck", "pckh", "mpjpe"):
    for key, value in (m.get(group) or {}).items():
      if key in COLUMNS:
        row[key] = value
  return {c: row.get(c) for c in COLUMNS}


def write_tables(rows: Sequence[dict], out_dir: str) -> tuple[str, str]:
  """Writes sweep.csv and sweep.md atomically; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  columns = [c for c in COLUMNS if any(r.get(c) is not None for r in rows)]
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
  writer.writeheader()
  writer.writerows(rows)
  paths = (os.path.join(out_dir, "sweep.csv"), os.path.join(out_dir, "sweep.md"))
  for path, text in zip(paths, (buf.getvalue(), markdown_table(rows, columns))):
    storage.write_atomic(path, text)
  return paths


class _CheckpointLoader:
  """``runner.run``'s ``model_loader``: loads one checkpoint's weights at the first cell
  that needs them and hands them to its other cells (one checkpoint held at a time);
  ``model_params`` (model, params) stands in for every checkpoint's weights (tests)."""

  def __init__(self, model_params: Any = None):
    self.model_params = model_params
    self.key, self.loaded = None, None

  def __call__(self, config: Any, checkpoint: str, step: Optional[int]) -> tuple[Any, Any, Any]:
    if self.model_params is not None:
      return (config, *self.model_params)
    if self.key != (checkpoint, step):
      self.key, self.loaded = (checkpoint, step), loading.load_model(config, checkpoint, step)
    loaded_config, model, params = self.loaded
    return loading.with_model(config, loaded_config.model), model, params


def run_sweep(config: Any, checkpoints: Sequence[str], datasets: Sequence[str],
              decodes: Sequence[str], out_dir: str, *, max_persons: Optional[int] = None,
              progress: bool = True, model_params: Any = None, tokenizer: Any = None
              ) -> list[dict]:
  """Runs (or reads) every cell; returns the rows. ``model_params`` (model, params) stands
  in for every checkpoint's weights (tests)."""
  datasets = [parse_dataset(d) for d in datasets] or [("config", "")]
  decodes = list(decodes) or [""]
  loader = _CheckpointLoader(model_params)
  rows = []
  for checkpoint, ckpt_label in zip(checkpoints, checkpoint_labels(checkpoints)):
    step = loading.checkpoint_step(checkpoint)
    folder = os.path.join(out_dir, cell_dir_name(checkpoint, ckpt_label))
    for d_label, dataset in datasets:
      for dec in decodes:
        m = runner.run(with_decode(config, parse_decode(dec)),
                       os.path.join(folder, d_label, _slug(dec)), checkpoint=checkpoint,
                       dataset=dataset, max_persons=max_persons, progress=progress,
                       tokenizer=tokenizer, step=step, model_loader=loader)
        rows.append(row_of(ckpt_label, d_label, dec or "default", m))
        write_tables(rows, out_dir)
  return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, help="config file[:arg]")
  parser.add_argument("--checkpoints", default="",
                      help="comma-separated kptjax workdirs ('' = the config's weights)")
  parser.add_argument("--dataset", action="append", default=[],
                      help="[label:]source,key=value,... (repeat; default config.data.eval)")
  parser.add_argument("--decode", action="append", default=[],
                      help="config.decode overrides k=v,... (repeat; default: as configured)")
  parser.add_argument("--out", required=True)
  parser.add_argument("--max_persons", type=int, default=None)
  args = parser.parse_args(argv)
  rows = run_sweep(load_config(args.config), args.checkpoints.split(","), args.dataset,
                   args.decode, args.out, max_persons=args.max_persons)
  print(markdown_table(rows, [c for c in COLUMNS if any(r.get(c) is not None for r in rows)]))
  print(json.dumps({"csv": os.path.join(args.out, "sweep.csv"),
                    "markdown": os.path.join(args.out, "sweep.md")}))


if __name__ == "__main__":
  main()
