"""The main job: train and evaluate a small localizer on synthetic people, on a CPU.

    python -m kptjax.demo [--config configs/demo.py[:long]] [--workdir workdir/demo]

1. generates the synthetic train / held-out sets (cached; ``kptjax.data.synthetic``);
2. trains with the real pipeline and trainer (``kptjax.training.trainer.run``);
3. evaluates the final checkpoint with the jitted decoder (``kptjax.evaluate.run``) and
   the no-image mean-position baseline on the same held-out people;
4. writes ``metrics.json`` (model and baseline: PCK@0.05/0.1/0.2, COCO AP, parse
   failures, wall times), overlay PNGs (``overlays/``: truth | model | baseline) and
   prints a summary table.

Workdir layout: ``checkpoints/``, TensorBoard events, ``metrics.jsonl`` (training),
``model_config.json``, ``eval/`` (predictions + metrics of the model), ``baseline/``,
``overlays/``, ``metrics.json``. Running again resumes training and reuses finished
evaluations.
"""

from __future__ import annotations

import io
import os
import time
from typing import Any, Optional, Sequence

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from PIL import Image, ImageDraw

from kptjax import storage, viz, xla_cpu
from kptjax.data import pipeline, synthetic, transforms
from kptjax.evaluation import protocols, results, runner
from kptjax.keypoints import get_spec
from kptjax.training import trainer

# The demo's CPU devices: data parallel over the 2 cores of this project's CPU machines
# (kptjax.xla_cpu; on an accelerator host the job runs on the accelerator as usual).
DEMO_CPU_DEVICES = 2
SUMMARY_KEYS = ("PCK@0.05", "PCK@0.1", "PCK@0.2", "AP", "parse_failure_rate")


# ---------------------------------------------------------------------------
# The no-image baseline.


def _crop_affine(config: Any, record: Any) -> np.ndarray:
  """f32[2, 3] image -> crop pixels of the un-augmented crop of ``record``."""
  side = int(config.model.vit.image_size)
  center, scale = transforms.box_to_center_scale(record.box, 1.0, float(config.data.padding))
  return transforms.crop_affine(center, scale, 0.0, (side, side))


def mean_crop_position(config: Any, records: Sequence[Any]) -> np.ndarray:
  """f32[K, 2] each keypoint's mean position over ``records``' labelled keypoints, in
  crop pixels of the un-augmented crop (what a model that ignores the image answers)."""
  k = records[0].num_keypoints
  total, count = np.zeros((k, 2)), np.zeros((k, 1))
  for rec in records:
    xy = transforms.apply_affine(np.asarray(rec.keypoints)[:, :2], _crop_affine(config, rec))
    labelled = (np.asarray(rec.keypoints)[:, -1] > 0)[:, None]
    total += np.where(labelled, xy, 0.0)
    count += labelled
  if not count.all():
    missing = [i for i in range(k) if not count[i, 0]]
    raise ValueError(f"keypoints {missing} are never labelled in the training records")
  return (total / count).astype(np.float32)


def baseline_entries(config: Any, mean_crop: np.ndarray, records: Sequence[Any]
                     ) -> list[dict[str, Any]]:
  """Per-person entries (as ``kptjax.evaluate``'s) that answer ``mean_crop`` mapped
  into each person's crop."""
  entries = []
  for index, rec in enumerate(records):
    xy = transforms.apply_affine(mean_crop, transforms.invert_affine(_crop_affine(config, rec)))
    kps = np.concatenate([xy, np.ones((len(xy), 1), np.float32)], axis=1)
    entries.append({"index": index, "image_id": int(rec.image_id), "ann_id": int(rec.ann_id),
                    "keypoints": kps.round(3).tolist(), "score": 1.0,
                    "missing": [], "texts": []})
  return entries


def evaluate_baseline(config: Any, out_dir: str, train_records: Sequence[Any],
                      eval_records: Any) -> dict[str, Any]:
  """Metrics of the mean-position baseline on ``eval_records`` (written to ``out_dir``)."""
  spec = get_spec(eval_records[0].spec)
  mean_crop = mean_crop_position(config, train_records)
  entries = baseline_entries(config, mean_crop, eval_records)
  protocol = protocols.protocol_for(eval_records)
  result = protocols.compute_metrics(eval_records, entries, spec.names,
                                     coco_gt=protocols.oks_ground_truth(eval_records, protocol),
                                     sigmas=spec.sigmas, protocol=protocol)
  result["mean_crop_position"] = mean_crop.round(2).tolist()
  storage.write_json_atomic(os.path.join(out_dir, results.METRICS), result)
  return result


# ---------------------------------------------------------------------------
# Pictures.


def _panel(image: np.ndarray, keypoints: np.ndarray, spec: Any, title: str,
           scale: int, missing: Optional[np.ndarray] = None) -> np.ndarray:

  big = np.asarray(Image.fromarray(image).resize(
      (image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST))
  drawn = viz.draw_keypoints(big, np.asarray(keypoints)[:, :2] * scale + (scale - 1) / 2,
                             skeleton=spec.skeleton, names=spec.names, missing=missing)
  img = Image.fromarray(drawn)
  ImageDraw.Draw(img).text((4, 2), title, fill=(255, 255, 255))
  return np.asarray(img)


def model_entries(eval_dir: str) -> list[dict[str, Any]]:
  """``predictions.json`` of ``kptjax.evaluate.run`` (one per person, in record order)
  as entries {'index', 'keypoints' [K, 3]}."""
  import json
  with open(os.path.join(eval_dir, results.PREDICTIONS)) as f:
    preds = json.load(f)
  return [{"index": i, "keypoints": np.asarray(p["keypoints"]).reshape(-1, 3).tolist(),
           "missing": p.get("missing", [])} for i, p in enumerate(preds)]


def write_overlays(out_dir: str, records: Sequence[Any], model_entries: Sequence[dict],
                   baseline: Sequence[dict], count: int = 8, scale: int = 3) -> list[str]:
  """``out_dir/person_XXX.png``: truth | model | baseline on the held-out image.

  Returns the paths written.
  """
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for entry, base in list(zip(model_entries, baseline))[:count]:
    rec = records[entry["index"]]
    spec = get_spec(rec.spec)
    image = transforms.load_record_image(rec)
    kps = np.asarray(entry["keypoints"])
    unanswered = np.isin(np.arange(len(kps)), entry["missing"])
    panels = [_panel(image, np.asarray(rec.keypoints)[:, :2], spec, "truth", scale,
                     missing=np.asarray(rec.keypoints)[:, -1] <= 0),
              _panel(image, kps, spec, "model", scale, missing=unanswered),
              _panel(image, np.asarray(base["keypoints"]), spec, "no-image baseline", scale)]
    path = os.path.join(out_dir, f"person_{entry['index']:03d}.png")
    viz.save_png(path, np.concatenate(panels, axis=1))
    paths.append(path)
  return paths


def write_new_person(config: Any, workdir: str, index: int = 0) -> dict[str, Any]:
  """A synthetic image no split contains (split 'new') for ``kptjax.predict``:
  ``workdir/new_person.jpg`` and ``new_person.json`` (box, ground-truth keypoints)."""

  knobs = synthetic.get_knobs(config.data.eval.preset, config.data.eval.knobs)
  image, people = synthetic.render_image(int(config.data.eval.seed), "new", index, knobs)
  path = os.path.join(workdir, "new_person.jpg")
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="JPEG", quality=95)
  storage.write_atomic(path, buffer.getvalue())
  info = {"image": path, "box": [round(float(v), 1) for v in people[0]["box"]],
          "keypoints": people[0]["keypoints"].round(2).tolist()}
  storage.write_json_atomic(os.path.join(workdir, "new_person.json"), info)
  return info


# ---------------------------------------------------------------------------
# Summary.


def headline(result: dict[str, Any]) -> dict[str, float]:
  """The summary numbers of one metrics dict."""
  out = dict(result.get("pck", {}))
  out["AP"] = result.get("coco", {}).get("AP", float("nan"))
  out["parse_failure_rate"] = result.get("parse_failure_rate", 0.0)
  return {k: float(out.get(k, float("nan"))) for k in SUMMARY_KEYS}


def summary_table(model: dict[str, float], baseline: dict[str, float]) -> str:
  """Markdown table: model beside the baseline."""
  rows = ["| metric | model | no-image baseline | model - baseline |", "|---|---|---|---|"]
  for k in SUMMARY_KEYS:
    rows.append(f"| {k} | {model[k]:.3f} | {baseline[k]:.3f} | {model[k] - baseline[k]:+.3f} |")
  return "\n".join(rows)


def run(config: Any, workdir: str) -> dict[str, Any]:
  """The whole job; returns what ``metrics.json`` holds."""
  t0 = time.time()
  print(f"kptjax demo -> {workdir}: synthetic data (generated once, then cached), "
        f"train {config.train.num_steps} steps, evaluate", flush=True)
  train_records = pipeline.load_records(config, "train")
  eval_records = pipeline.load_records(config, "eval")
  t_data = time.time() - t0

  trainer.run(config, workdir)
  t_train = time.time() - t0 - t_data

  model = runner.run(config, os.path.join(workdir, "eval"), checkpoint=workdir)
  t_eval = time.time() - t0 - t_data - t_train
  base = evaluate_baseline(config, os.path.join(workdir, "baseline"), train_records,
                           eval_records)
  entries = model_entries(os.path.join(workdir, "eval"))
  overlays = write_overlays(os.path.join(workdir, "overlays"), eval_records, entries,
                            baseline_entries(config, mean_crop_position(config, train_records),
                                             eval_records))
  new = write_new_person(config, workdir)
  result = {
      "model": headline(model), "baseline": headline(base),
      "num_eval_persons": model["num_persons"], "num_train_images":
      int(config.data.train.num_images), "train_steps": int(config.train.num_steps),
      "wall_s": {"data": t_data, "train": t_train, "eval": t_eval,
                 "total": time.time() - t0},
      "overlays": [os.path.relpath(p, workdir) for p in overlays],
      "model_details": os.path.join("eval", results.METRICS),
      "baseline_details": os.path.join("baseline", results.METRICS),
  }
  storage.write_json_atomic(os.path.join(workdir, "metrics.json"), result)
  print(f"\nkptjax demo: {result['num_eval_persons']} held-out synthetic people, "
        f"{result['train_steps']} steps, {result['wall_s']['total'] / 60:.1f} min "
        f"(data {t_data:.0f} s, train {t_train:.0f} s, eval {t_eval:.0f} s)\n")
  print(summary_table(result["model"], result["baseline"]))
  print(f"\nworkdir: {workdir} (metrics.json, overlays/, TensorBoard: "
        f"tensorboard --logdir {workdir})")
  box = ",".join(f"{v:g}" for v in new["box"])
  print(f"Try a new image: python -m kptjax.predict --config configs/demo.py "
        f"--checkpoint {workdir} --image {new['image']} --box {box} --out {workdir}/predict")
  return result


FLAGS = flags.FLAGS


def _define_flags() -> None:
  config_flags.DEFINE_config_file("config", "configs/demo.py", "Demo config file.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", "workdir/demo", "Output directory.")
  flags.DEFINE_bool("verbose", False, "Log at INFO (checkpointing, parameter overview).")


def main(argv: Sequence[str]) -> None:
  del argv
  xla_cpu.configure(devices=DEMO_CPU_DEVICES)
  if not FLAGS.verbose:   # progress bars and the summary; warnings and errors still log
    logging.set_verbosity(logging.WARNING)
  run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
