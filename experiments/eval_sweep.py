r"""Evaluation sweep: checkpoints x datasets x decoding options -> one CSV + one Markdown table.

    python experiments/eval_sweep.py --config configs/tiny.py \
        --checkpoints runs/a,runs/b \
        --dataset 'coco:coco,ann_file=/data/coco/val.json,image_root=/data/coco/val2017' \
        --dataset 'mpii:mpii,json_file=/data/mpii/valid.json,image_root=/data/mpii/images' \
        --decode 'constrained=False' --decode 'constrained=True,share_prefix=False' \
        --out results/sweep

Every cell is one ``kptjax.evaluate.run`` writing ``OUT/<checkpoint>/<dataset>/<decode>/``
(``predictions.json`` + ``metrics.json``); a cell whose files exist is read, not
recomputed, so an interrupted sweep continues where it stopped (and a half-done cell
resumes from its partial predictions). A checkpoint whose cells are all done is not even
loaded. ``--dataset`` is ``[label:]source,key=value,...`` as evaluate's ``--dataset`` (an
empty source means ``config.data.eval``); ``--decode`` overrides ``config.decode`` fields;
``--checkpoints ''`` evaluates the config's own weights (Hugging Face dirs or random).

Writes ``OUT/sweep.csv`` and ``OUT/sweep.md`` (one row per cell) and prints the table.
"""

from __future__ import annotations

import argparse
import ast
import csv
import importlib.util
import io
import json
import os
import re
import sys
from typing import Any, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

COLUMNS = ("checkpoint", "dataset", "decode", "persons", "parse_failures", "AP", "AP50", "AR",
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


def parse_dataset(text: str) -> tuple[str, str]:
  """'[label:]source,k=v,...' -> (label, evaluate's --dataset string)."""
  label, sep, rest = text.partition(":")
  if not sep or "," in label or "=" in label:
    label, rest = "", text
  source = rest.split(",", 1)[0].strip()
  return _slug(label or source or "config"), rest


def parse_decode(text: str) -> dict[str, Any]:
  """'constrained=True,max_new_tokens=20' -> {'constrained': True, 'max_new_tokens': 20}."""
  out = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    key, _, value = part.partition("=")
    try:
      out[key.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      out[key.strip()] = value.strip()
  return out


def with_decode(config: Any, overrides: dict[str, Any]) -> Any:
  """A copy of ``config`` with ``config.decode`` fields overridden."""
  import ml_collections
  from kptjax import errors
  c = ml_collections.ConfigDict(config.to_dict())
  for key, value in overrides.items():
    if key not in c.decode:
      raise errors.ConfigError(f"--decode: unknown config.decode field '{key}'; known: "
                               f"{sorted(c.decode.keys())}")
    c.decode[key] = type(c.decode[key])(value)
  return c.lock()


def row_of(checkpoint: str, dataset: str, decode_label: str, m: dict[str, Any]) -> dict:
  """One table row from a cell's metrics.json."""
  row = {"checkpoint": checkpoint, "dataset": dataset, "decode": decode_label,
         "persons": m.get("num_persons"), "parse_failures": m.get("parse_failures"),
         "persons_per_s": m.get("persons_per_s")}
  for group in ("coco", "pck", "pckh", "mpjpe"):
    for key, value in (m.get(group) or {}).items():
      if key in COLUMNS:
        row[key] = value
  return {c: row.get(c) for c in COLUMNS}


def write_tables(rows: Sequence[dict], out_dir: str) -> tuple[str, str]:
  """Writes sweep.csv and sweep.md atomically; returns their paths."""
  from kptjax.metrics import markdown_table
  os.makedirs(out_dir, exist_ok=True)
  columns = [c for c in COLUMNS if any(r.get(c) is not None for r in rows)]
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
  writer.writeheader()
  writer.writerows(rows)
  paths = (os.path.join(out_dir, "sweep.csv"), os.path.join(out_dir, "sweep.md"))
  for path, text in zip(paths, (buf.getvalue(), markdown_table(rows, columns))):
    with open(path + ".tmp", "w") as f:
      f.write(text)
    os.replace(path + ".tmp", path)
  return paths


def run_sweep(config: Any, checkpoints: Sequence[str], datasets: Sequence[str],
              decodes: Sequence[str], out_dir: str, *, max_persons: Optional[int] = None,
              progress: bool = True, model_params: Any = None, tokenizer: Any = None
              ) -> list[dict]:
  """Runs (or reads) every cell; returns the rows. ``model_params`` (model, params) stands
  in for every checkpoint's weights (tests)."""
  from kptjax import evaluate
  datasets = [parse_dataset(d) for d in datasets] or [("config", "")]
  decodes = list(decodes) or [""]
  rows = []
  for checkpoint in checkpoints:
    ckpt_label = _slug(os.path.basename(checkpoint.rstrip("/")) or "config-weights")
    cells = [(dl, ds, dec, os.path.join(out_dir, ckpt_label, dl, _slug(dec)))
             for dl, ds in datasets for dec in decodes]
    loaded = None
    for d_label, dataset, dec, cell in cells:
      if not evaluate.is_done(cell) and loaded is None:
        if model_params is not None:
          loaded = (config, *model_params)
        else:
          loaded = evaluate.load_model(config, checkpoint)
        tokenizer = tokenizer or evaluate.load_tokenizer(loaded[0])
      cell_config = with_decode(loaded[0] if loaded else config, parse_decode(dec))
      m = evaluate.run(cell_config, cell, checkpoint=checkpoint, dataset=dataset,
                       max_persons=max_persons, progress=progress,
                       model_params=loaded[1:] if loaded else None, tokenizer=tokenizer)
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
  from kptjax.metrics import markdown_table
  print(markdown_table(rows, [c for c in COLUMNS if any(r.get(c) is not None for r in rows)]))
  print(json.dumps({"csv": os.path.join(args.out, "sweep.csv"),
                    "markdown": os.path.join(args.out, "sweep.md")}))


if __name__ == "__main__":
  main()
