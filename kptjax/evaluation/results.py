"""What an evaluation writes and reads back: its files, their provenance, the partial
predictions of an interrupted run, and the public predictions file.

Outputs in the out dir (each written atomically: ``kptjax.storage``):
  predictions.json  2D: COCO results format, one entry per person
                    {image_id, category_id, keypoints [x, y, score] * K, score, missing};
                    3D: a list of {image_id, ann_id, keypoints [x, y, score] * K (pixels),
                    keypoints_3d [[x, y, z] mm, camera coordinates, root depth from the
                    ground truth as in LocLLM] * K, depth_rel [mm] * K, score, missing}.
                    ``missing`` lists the keypoints without an answer (unparseable, or the
                    person's image could not be read); their values are written as 0.
  predictions.provenance.json
                    {"provenance": <record>, "predictions": "predictions.json",
                     "sha256": <hex of predictions.json>}: what made predictions.json.
  metrics.json      every metric of the protocol, counts, speed, and ``provenance``
                    (``kptjax.evaluation.provenance``).
  predictions.partial.jsonl
                    while a run decodes: its provenance line, then one person per line.

Earlier outputs are reused only when their provenance record equals this run's;
otherwise they are removed and recomputed from scratch (one log line says what
differed); partial predictions of another run are never merged.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional, Sequence

import numpy as np
from absl import logging

from kptjax import storage
from kptjax.evaluation import protocols, provenance

PREDICTIONS = "predictions.json"
PREDICTIONS_PROVENANCE = "predictions.provenance.json"
METRICS = "metrics.json"
PARTIAL = "predictions.partial.jsonl"
FINAL_FILES = (PREDICTIONS, PREDICTIONS_PROVENANCE, METRICS)
# config.data fields that do not change an evaluation's answers (training only).
TRAIN_ONLY_DATA = ("train", "eval", "augment", "curriculum", "curriculum_augment",
                   "num_workers", "read_threads", "read_thread_priority", "image_cache_mb",
                   "rounds")


def is_done(out_dir: str) -> bool:
  """Every final file exists (whoever made them: see :func:`saved_result`)."""
  return all(os.path.exists(os.path.join(out_dir, n)) for n in FINAL_FILES)


def sha256_file(path: str) -> str:
  """SHA-256 hex of a file's bytes."""
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _differences(out_dir: str, record: dict, files: Sequence[str]) -> list[str]:
  """Fields in which the finished outputs of ``out_dir`` were made differently from
  ``record`` ([] = reusable); 'predictions.json' when it is not the file the sidecar
  describes."""
  with open(os.path.join(out_dir, METRICS)) as f:
    diff = provenance.compare(json.load(f).get("provenance"), record)
  if not diff and PREDICTIONS_PROVENANCE in files:
    with open(os.path.join(out_dir, PREDICTIONS_PROVENANCE)) as f:
      sidecar = json.load(f)
    diff = provenance.compare(sidecar.get("provenance"), record)
    if not diff and sidecar.get("sha256") != sha256_file(os.path.join(out_dir, PREDICTIONS)):
      diff = [PREDICTIONS]
  return diff


def saved_result(out_dir: str, record: dict, files: Sequence[str] = FINAL_FILES
                 ) -> Optional[dict]:
  """The saved metrics of ``out_dir`` when its outputs (``files``, metrics.json among
  them) were made with provenance ``record``; else None, and outputs made otherwise are
  removed (one log line says what differed)."""
  present = [n for n in files if os.path.exists(os.path.join(out_dir, n))]
  if not present:
    return None
  try:
    diff = _differences(out_dir, record, files) if len(present) == len(files) else \
        [f"{n} absent" for n in files if n not in present]
  except (OSError, json.JSONDecodeError, AttributeError) as e:
    diff = [f"unreadable ({e})"]
  if not diff:
    logging.info("%s: finished with the same provenance: reusing it", out_dir)
    with open(os.path.join(out_dir, METRICS)) as f:
      return json.load(f)
  logging.warning("%s: earlier results were made by another run (differs in: %s); "
                  "recomputing from scratch", out_dir, ", ".join(diff[:8]))
  for name in present:
    os.remove(os.path.join(out_dir, name))
  return None


def read_partial(path: str, record: dict) -> dict[int, dict]:
  """Finished persons by index when the file's first line is provenance ``record`` (else
  {}: another run's partial predictions are never merged; logged). A truncated last line
  (a crash mid-write) is dropped."""
  done: dict[int, dict] = {}
  if not os.path.exists(path):
    return done
  with open(path) as f:
    try:
      header = json.loads(f.readline() or "{}")
    except json.JSONDecodeError:
      header = {}
    diff = provenance.compare(header.get("provenance"), record)
    if diff:
      logging.warning("%s: partial predictions of another run (differs in: %s); "
                      "recomputing from scratch", path, ", ".join(diff[:8]))
      return done
    for line in f:
      try:
        item = json.loads(line)
      except json.JSONDecodeError:
        break
      done[int(item["index"])] = item
  if done:
    logging.info("%s: resuming after %d persons", path, len(done))
  return done


# ---------------------------------------------------------------------------
# Provenance of an evaluation.


def dataset_paths(values: Sequence[Any], records: Any) -> list[str]:
  """The string values of the dataset spec (``loading.dataset_values``) and the
  records' source file: the candidates for ``provenance.file_stamps``."""
  return [str(v) for v in values + [getattr(records, "source", "")] if isinstance(v, str) and v]


def config_sections(config: Any, checkpoint: str = "") -> dict[str, Any]:
  """The config sections an evaluation's answers depend on, for ``provenance.build``:
  model, decode (without the training hook's ``eval_persons``), the prompt / crop part of
  data, and without a kptjax checkpoint the weights' origin (Hugging Face dirs, seed)."""
  data = {k: v for k, v in config.data.to_dict().items() if k not in TRAIN_ONLY_DATA}
  decode = {k: v for k, v in config.decode.to_dict().items() if k != "eval_persons"}
  out = {"model": config.model, "decode": decode, "data": data}
  if not checkpoint:
    out["weights"] = {"checkpoints": config.checkpoints.to_dict(), "seed": config.seed}
  return out


def eval_provenance(config: Any, records: Any, *, checkpoint: str = "", dataset: str = "",
                    dataset_values: Sequence[Any] = (),
                    step: Optional[int] = None, evaluation: Optional[dict] = None) -> dict:
  """The provenance record of one evaluation (``kptjax.evaluation.provenance.build``).
  ``dataset_values``: the values of the dataset spec (``loading.dataset_values``)."""
  return provenance.build(checkpoint=checkpoint, step=step,
                          configs=config_sections(config, checkpoint),
                          dataset=dataset or config.data.eval,
                          files=dataset_paths(list(dataset_values), records),
                          evaluation=evaluation)


# ---------------------------------------------------------------------------
# The public files.


def predictions_file(records: Sequence[Any], entries: Sequence[dict], is_3d: bool,
                     categories: Optional[dict[int, int]] = None, root: int = 0) -> list[dict]:
  """The public predictions.json content (see the module docstring).

  categories: {ann_id: category_id} for results on ground-truth boxes (default 1).
  """
  out, categories = [], categories or {}
  for e in entries:
    if not is_3d:
      out.append(protocols.coco_entry(e, categories))
      continue
    rec = records[e["index"]]
    kp = np.array(e["keypoints"])
    miss = protocols.missing_mask([e], len(kp))[0]
    cam = protocols.camera_3d(rec, kp[:, :2], np.array(e["depth_rel"]), root)
    cam[miss | miss[root]] = 0.0            # no answer, or no root to place it from
    out.append({"image_id": e["image_id"], "ann_id": e["ann_id"],
                "keypoints": kp.reshape(-1).round(3).tolist(),
                "keypoints_3d": cam.round(2).tolist(), "depth_rel": e["depth_rel"],
                "score": e["score"], "missing": e["missing"]})
  return out


def write_person_outputs(out_dir: str, predictions: list[dict], result: dict,
                         record: dict) -> None:
  """predictions.json, its provenance sidecar, then metrics.json (in that order: a run
  killed in between leaves no metrics.json, so it is not taken as finished)."""
  predictions_path = os.path.join(out_dir, PREDICTIONS)
  storage.write_json_atomic(predictions_path, predictions)
  storage.write_json_atomic(os.path.join(out_dir, PREDICTIONS_PROVENANCE),
                            {"provenance": record, "predictions": PREDICTIONS,
                             "sha256": sha256_file(predictions_path)})
  storage.write_json_atomic(os.path.join(out_dir, METRICS), result)
