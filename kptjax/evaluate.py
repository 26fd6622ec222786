r"""Checkpoint x dataset -> ``predictions.json`` + ``metrics.json``.

    python -m kptjax.evaluate --config configs/tiny.py --checkpoint WORKDIR \
        --dataset coco,ann_file=/data/coco/person_keypoints_val2017.json,image_root=/data/coco/val2017 \
        --out results/coco

``--dataset`` is a source name of ``kptjax.data.sources.read_dataset`` followed by its
keyword arguments (``ann_file``, ``image_root``, ``det_file``, ``headbox_file``,
``camera_file``, ...); without it the config's ``data.eval`` set is used.

Outputs in ``--out`` (each written to a temporary file, then renamed: never half-written):
  predictions.json  2D: COCO results format, one entry per person
                    {image_id, category_id, keypoints [x, y, score] * K, score, missing};
                    3D: a list of {image_id, ann_id, keypoints [x, y, score] * K (pixels),
                    keypoints_3d [[x, y, z] mm, camera coordinates, root depth from the
                    ground truth as in LocLLM] * K, depth_rel [mm] * K, score, missing}.
                    ``missing`` lists the keypoints without an answer (unparseable, or the
                    person's image could not be read); their values are written as 0.
  predictions.provenance.json
                    {"provenance": <record>, "predictions": "predictions.json",
                     "sha256": <hex of predictions.json>}: what made predictions.json
                    (a sidecar, so that predictions.json stays a plain COCO results list).
  metrics.json      every metric that applies (COCO AP/AR, PCK, PCKh, MPJPE), the
                    per-keypoint table, parse failures and missing keypoints, unreadable
                    images, speed, and ``provenance`` (``kptjax.evaluation.provenance``).
Resumable: finished persons are appended to ``predictions.partial.jsonl`` (its first line
is the provenance record) as they are decoded and skipped on restart. Earlier outputs are
reused only when their provenance record equals this run's (checkpoint path and step,
model / decode / data config hashes, dataset spec and its files' sizes and mtimes, kptjax
version, max_persons / pckh_variant); otherwise they are removed and recomputed from
scratch, which one log line says (partial predictions of another checkpoint are never
merged).

A keypoint is a number or it is missing (``parsing.Localization.missing``): missing
keypoints are misses in PCK / PCKh, never match in OKS, and are counted (not averaged)
in MPJPE. A person whose image is missing or corrupt (``errors.ImageError``) is kept,
every keypoint missing, and counted in ``metrics.json`` (``image_errors``).

Person score = mean keypoint score (LocLLM; 0 for a missing keypoint) x the box score
(1 for ground-truth boxes).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from kptjax import errors, storage
from kptjax.evaluation import metrics, provenance
from kptjax.inference import parsing

PREDICTIONS = "predictions.json"
PREDICTIONS_PROVENANCE = "predictions.provenance.json"
METRICS = "metrics.json"
PARTIAL = "predictions.partial.jsonl"
FINAL_FILES = (PREDICTIONS, PREDICTIONS_PROVENANCE, METRICS)
# config.data fields that do not change an evaluation's answers (training only).
_TRAIN_ONLY_DATA = ("train", "eval", "augment", "curriculum", "curriculum_augment",
                    "num_workers", "read_threads", "rounds")


# ---------------------------------------------------------------------------
# Files.


def is_done(out_dir: str) -> bool:
  """Every final file exists (whoever made them: see :func:`saved_result`)."""
  return all(os.path.exists(os.path.join(out_dir, n)) for n in FINAL_FILES)


def _sha256_file(path: str) -> str:
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
    if not diff and sidecar.get("sha256") != _sha256_file(os.path.join(out_dir, PREDICTIONS)):
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


def _read_partial(path: str, record: dict) -> dict[int, dict]:
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
# Model, tokenizer, data.


def _model_config_file(checkpoint: str) -> Optional[str]:
  """``model_config.json`` that ``kptjax.train`` writes beside ``checkpoints/``."""
  path = os.path.abspath(checkpoint.rstrip("/"))
  for d in (path, os.path.dirname(path)):
    candidate = os.path.join(d, "model_config.json")
    if os.path.exists(candidate):
      return candidate
  return None


def _with_model(config: Any, model_config: Any) -> Any:
  import ml_collections
  c = ml_collections.ConfigDict(config.to_dict())
  c.model = ml_collections.ConfigDict(dict(model_config))
  return c.lock()


def resolve_config(config: Any, checkpoint: str = "") -> Any:
  """``config`` with the model section of the checkpoint's ``model_config.json`` (what
  training resolved from the Hugging Face dirs) when there is one; reads no weights."""
  model_file = _model_config_file(checkpoint) if checkpoint else None
  if not model_file:
    return config
  with open(model_file) as f:
    return _with_model(config, json.load(f))


def checkpoint_step(checkpoint: str) -> Optional[int]:
  """The step ``load_model`` restores from ``checkpoint`` (its latest), None without one."""
  if not checkpoint or not os.path.isdir(checkpoint):
    return None
  from kptjax.training import checkpoint as ckpt_lib
  try:
    return ckpt_lib.latest_step(checkpoint)
  except errors.CheckpointError:
    return None


def load_model(config: Any, checkpoint: str = "", step: Optional[int] = None
               ) -> tuple[Any, Any, Any]:
  """(config, VLM, params) for inference.

  From a kptjax checkpoint (a training workdir or its ``checkpoints`` dir, at ``step``,
  default the latest; the model section is taken from the workdir's
  ``model_config.json`` when present, as training resolved it from the Hugging Face
  dirs), else from the Hugging Face dirs in ``config.checkpoints``, else random weights
  (logged).

  Raises:
    CheckpointError: the checkpoint is unreadable or lacks some of the model's params.
  """
  import flax.linen as nn
  import jax

  from kptjax.models import vlm

  if checkpoint:
    from kptjax.training import checkpoint as ckpt_lib
    if not os.path.exists(checkpoint):
      raise errors.CheckpointError(f"{checkpoint}: no such checkpoint directory")
    config = resolve_config(config, checkpoint)
    abstract = nn.meta.unbox(vlm.abstract_params(config.model))
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: sharding, abstract)
    params, missing = ckpt_lib.load_params(checkpoint, abstract, shardings, step=step)
    if missing:
      raise errors.CheckpointError(
          f"{checkpoint}: {len(missing)} params of the model are not in the checkpoint "
          f"(is --config the one it was trained with?): {missing[:5]}")
    return config, vlm.VLM(config.model), params
  if config.checkpoints.llm_dir or config.checkpoints.vit_dir:
    from kptjax import convert
    model_config, params = convert.load_vlm(config)
    config = _with_model(config, model_config.to_dict())
    return config, vlm.VLM(config.model), params
  logging.warning("No --checkpoint and no config.checkpoints dirs: random weights.")
  return config, vlm.VLM(config.model), vlm.init_params(config.model, jax.random.key(config.seed))


def load_tokenizer(config: Any) -> Any:
  """The checkpoint's tokenizer (``config.checkpoints.tokenizer_dir``; '' = bundled tiny)."""
  from kptjax.data import tokenizer as tok_lib
  bins = int(config.data.get("loc_bins", 100)) if config.data.coord_format == "loc_tokens" else 0
  return tok_lib.load_tokenizer(config.checkpoints.tokenizer_dir or "", loc_bins=bins)


def load_eval_records(config: Any, dataset: str = "") -> Any:
  """Records of ``--dataset`` ('source,key=value,...') or of ``config.data.eval``."""
  from kptjax.data import pipeline
  if not dataset:
    return pipeline.load_records(config, "eval")
  from kptjax.data.sources import eval_options, read_dataset
  name, *rest = [p.strip() for p in dataset.split(",") if p.strip()]
  for part in rest:
    if "=" not in part:
      raise errors.ConfigError(f"--dataset: expected key=value after the source name, "
                               f"got '{part}'")
  options = pipeline._parse_options(",".join(rest))  # pylint: disable=protected-access
  return read_dataset(name, **eval_options(name, options))


def _dataset_paths(config: Any, dataset: str, records: Any) -> list[str]:
  """Every option value of the dataset spec (``--dataset`` or ``config.data.eval``) and
  the records' source file: the candidates for ``provenance.file_stamps``."""
  from kptjax.data import pipeline
  options = pipeline._parse_options  # pylint: disable=protected-access
  if dataset:
    values = list(options(",".join(dataset.split(",")[1:])).values())
  else:
    d = config.data.eval
    values = list(d.values()) + list(options(d.get("options", "")).values())
  return [str(v) for v in values + [getattr(records, "source", "")] if isinstance(v, str) and v]


def config_sections(config: Any, checkpoint: str = "") -> dict[str, Any]:
  """The config sections an evaluation's answers depend on, for ``provenance.build``:
  model, decode (without the training hook's ``eval_persons``), the prompt / crop part of
  data, and without a kptjax checkpoint the weights' origin (Hugging Face dirs, seed)."""
  data = {k: v for k, v in config.data.to_dict().items() if k not in _TRAIN_ONLY_DATA}
  decode = {k: v for k, v in config.decode.to_dict().items() if k != "eval_persons"}
  out = {"model": config.model, "decode": decode, "data": data}
  if not checkpoint:
    out["weights"] = {"checkpoints": config.checkpoints.to_dict(), "seed": config.seed}
  return out


def eval_provenance(config: Any, records: Any, *, checkpoint: str = "", dataset: str = "",
                    step: Optional[int] = None, evaluation: Optional[dict] = None) -> dict:
  """The provenance record of one evaluation (``kptjax.evaluation.provenance.build``)."""
  return provenance.build(checkpoint=checkpoint, step=step,
                          configs=config_sections(config, checkpoint),
                          dataset=dataset or config.data.eval,
                          files=_dataset_paths(config, dataset, records), evaluation=evaluation)


def iter_crops(config: Any, records: Sequence[Any], indices: Sequence[int]) -> Iterator[dict]:
  """Eval elements of ``records[i]`` for i in ``indices``, in order, made by the eval
  pipeline's transform (``kptjax.data.pipeline.EvalTransform``: same crop as training,
  no augmentation): {'index', 'image' f32[S, S, 3] normalized, 'affine_inv' f32[2, 3], ...}.
  A person whose image is missing or corrupt gives {'index', 'image_error': message}.
  Images are decoded by a few threads ahead of the decoder."""
  from concurrent.futures import ThreadPoolExecutor

  from kptjax.data import pipeline
  transform = pipeline.EvalTransform(config, records)

  def element(index: int) -> dict:
    try:
      return transform(index)
    except errors.ImageError as e:
      return {"index": np.int32(index), "image_error": str(e)}

  with ThreadPoolExecutor(max_workers=4) as pool:
    yield from pool.map(element, indices)


def _batches(items: Iterator[dict], size: int) -> Iterator[list[dict]]:
  batch = []
  for item in items:
    batch.append(item)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


def decode_persons(localizer: Any, records: Sequence[Any], items: Iterator[dict],
                   batch_size: int) -> Iterator[list[dict]]:
  """Eval elements -> per-person prediction entries, one list per batch.

  Batches have a static size (the tail is padded with copies and the copies dropped),
  so the decoder compiles once. An element with an ``image_error`` is not decoded: its
  entry has every keypoint missing and the error (logged).
  """
  for batch in _batches(items, batch_size):
    good = [b for b in batch if "image_error" not in b]
    loc = None
    if good:
      pad = good + [good[0]] * (batch_size - len(good))
      loc = localizer(np.stack([b["image"] for b in pad]),
                      np.stack([b["affine_inv"] for b in pad]))
    row = {int(b["index"]): i for i, b in enumerate(good)}
    entries = []
    for item in batch:
      index = int(item["index"])
      if "image_error" in item:
        logging.warning("person %d: %s; all its keypoints are scored as missing", index,
                        item["image_error"])
        entries.append(_unanswered_entry(records[index], index, len(localizer.names),
                                         localizer.count == 3, item["image_error"]))
      else:
        entries.append(_person_entry(records[index], index, loc, row[index]))
    yield entries


# ---------------------------------------------------------------------------
# Predictions -> metrics.


def _person_entry(rec: Any, index: int, loc: parsing.Localization, i: int) -> dict:
  """The partial-file entry of one decoded person: keypoints [K, 3] (x px, y px, score;
  0 where missing), ``missing`` keypoint indices, answer texts."""
  kps = np.concatenate([loc.keypoints[i], loc.scores[i][:, None]], axis=1)
  entry = {"index": int(index), "image_id": int(rec.image_id), "ann_id": int(rec.ann_id),
           "keypoints": kps.round(3).tolist(),
           "score": float(loc.person_scores[i]) * float(rec.score),
           "missing": np.flatnonzero(loc.missing[i]).tolist(), "texts": loc.texts[i]}
  if loc.depth is not None:
    entry["depth_rel"] = loc.depth[i].round(3).tolist()
  return entry


def _unanswered_entry(rec: Any, index: int, k: int, is_3d: bool, error: str) -> dict:
  """The entry of a person that could not be decoded: every keypoint missing."""
  entry = {"index": int(index), "image_id": int(rec.image_id), "ann_id": int(rec.ann_id),
           "keypoints": np.zeros((k, 3)).tolist(), "score": 0.0, "missing": list(range(k)),
           "texts": [""] * k, "image_error": error}
  if is_3d:
    entry["depth_rel"] = [0.0] * k
  return entry


def missing_counts(missing: np.ndarray, asked: np.ndarray, unreadable: np.ndarray,
                   unreadable_files: Sequence[str] = ()) -> dict[str, Any]:
  """The counts of missing answers every metrics.json carries.

  Args:
    missing: bool[N, K] keypoints scored as missing.
    asked: bool[N, K] keypoints asked (all of them in ``evaluate``).
    unreadable: bool[N] instances not decoded because an image could not be read.
    unreadable_files: those images.
  Returns:
    {'num_answers': answers decoded, 'parse_failures': of those, unparseable,
     'parse_failure_rate', 'missing_keypoints': asked and missing (parse failures + the
     unreadable instances' keypoints), 'image_errors': unreadable instances,
     'unreadable_images': the files, sorted}.
  """
  decoded = asked & ~unreadable[:, None]
  failed = int((missing & decoded).sum())
  n = int(decoded.sum())
  return {"num_answers": n, "parse_failures": failed,
          "parse_failure_rate": failed / n if n else 0.0,
          "missing_keypoints": int((missing & asked).sum()),
          "image_errors": int(unreadable.sum()), "unreadable_images": sorted(set(unreadable_files))}


def missing_mask(entries: Sequence[dict], k: int) -> np.ndarray:
  """bool[N, K] from the entries' ``missing`` index lists."""
  out = np.zeros((len(entries), k), bool)
  for i, e in enumerate(entries):
    out[i, list(e["missing"])] = True
  return out


def _camera_3d(rec: Any, xy: np.ndarray, depth_rel: np.ndarray, root: int = 0) -> np.ndarray:
  """LocLLM's 3D: root-relative depth + the ground-truth root depth, back-projected."""
  z = depth_rel - depth_rel[root] + float(rec.keypoints_3d[root, 2])
  return metrics.pixel_to_camera(xy, z, rec.camera["f"], rec.camera["c"])


def category_ids(coco_gt: Optional[str], records: Sequence[Any]) -> dict[int, int]:
  """{record ann_id: category id} for the results: each record's category (the
  annotation's, or the detection's) by name in the COCO file's ``categories``; a record
  without one takes the file's only category.

  Raises:
    DataError: a record's category is not in the file, or it has none and the file has
      several.
  """
  if not coco_gt:
    return {}
  by_name = metrics.coco_categories(coco_gt)
  out = {}
  for r in records:
    if r.category is not None and str(r.category) in by_name:
      out[int(r.ann_id)] = by_name[str(r.category)]
    elif r.category is None and len(by_name) == 1:
      out[int(r.ann_id)] = next(iter(by_name.values()))
    else:
      raise errors.DataError(coco_gt, f"category {r.category!r} of the person on image "
                             f"{r.image_id} is not one of the file's {len(by_name)} categories",
                             field="categories", record=r.ann_id)
  return out


def check_protocol(records: Sequence[Any], mpii_box_pck: bool = False) -> None:
  """Refuses a dataset whose benchmark metric cannot be computed, before any decoding.

  MPII's metric is PCKh, which needs every record's head box (``headbox_file``);
  without them only box PCK can be reported, and only when asked (``mpii_box_pck``).
  """
  if records and records[0].dataset == "mpii" and not mpii_box_pck and \
      any(r.head_box is None for r in records):
    raise errors.ConfigError(
        f"{getattr(records, 'source', 'mpii')}: MPII is scored by PCKh, which needs the head "
        "boxes: add headbox_file=<mpii_gt_val.mat> to the dataset, or ask for box PCK only "
        "(--mpii_box_pck, config.decode.mpii_box_pck)")


def _coco_entry(e: dict, categories: dict[int, int]) -> dict:
  """The COCO results entry of a partial-file entry (missing keypoints as 0 and listed)."""
  kp = np.array(e["keypoints"])
  return metrics.coco_result(e["image_id"], kp, e["score"], categories.get(int(e["ann_id"]), 1),
                             missing=missing_mask([e], len(kp))[0])


def predictions_file(records: Sequence[Any], entries: Sequence[dict], is_3d: bool,
                     categories: Optional[dict[int, int]] = None, root: int = 0) -> list[dict]:
  """The public predictions.json content (see the module docstring).

  categories: {ann_id: category_id} for results on ground-truth boxes (default 1).
  """
  out, categories = [], categories or {}
  for e in entries:
    if not is_3d:
      out.append(_coco_entry(e, categories))
      continue
    rec = records[e["index"]]
    kp = np.array(e["keypoints"])
    miss = missing_mask([e], len(kp))[0]
    cam = _camera_3d(rec, kp[:, :2], np.array(e["depth_rel"]), root)
    cam[miss | miss[root]] = 0.0            # no answer, or no root to place it from
    out.append({"image_id": e["image_id"], "ann_id": e["ann_id"],
                "keypoints": kp.reshape(-1).round(3).tolist(),
                "keypoints_3d": cam.round(2).tolist(), "depth_rel": e["depth_rel"],
                "score": e["score"], "missing": e["missing"]})
  return out


def compute_metrics(records: Sequence[Any], entries: Sequence[dict], names: Sequence[str], *,
                    coco_gt: Optional[str] = None, sigmas: Optional[Sequence[float]] = None,
                    pckh_variant: str = "standard", has_gt: bool = True,
                    root: int = 0, mpii_box_pck: bool = False) -> dict[str, Any]:
  """Every metric that applies to these records.

  Args:
    records: the PersonRecords (``entries[i]['index']`` points into them).
    entries: per-person predictions (``_person_entry``).
    names: the K keypoint names asked.
    coco_gt: COCO-format ground-truth file for OKS AP (COCO-format sources).
    sigmas: OKS sigmas (the keypoint spec's); AP is skipped without them.
    pckh_variant: 'standard' or 'locllm' (``metrics.pckh``).
    has_gt: whether records carry ground-truth keypoints (False for detection boxes).
    root: root joint of 3D poses (the spec's ``root_index``).
    mpii_box_pck: MPII without head boxes reports box PCK only (else ConfigError).

  OKS AP is the benchmark's own protocol (``metrics.ap_protocol`` of the records'
  dataset: CrowdPose's AP(E/M/H), AIC's mmpose setting, else COCO's) over every image of
  ``coco_gt`` holding the records' categories (images where the detector found nobody
  included), or, when only the first persons were decoded (``max_persons``), over their
  images. Categories are the records' own (annotation's or detection's).

  PCKh needs head boxes on every record and 16 keypoints in MPII order (its groups and
  the joints left out of the mean are MPII's).

  Missing keypoints (``entries[i]['missing']``) are passed to every metric as ``missing``
  (misses in PCK / PCKh and OKS, counted in MPJPE). Counts: ``num_answers`` answers
  decoded, ``parse_failures`` of them unparseable (``parse_failure_rate``),
  ``image_errors`` persons not decoded because their image could not be read
  (``unreadable_images`` lists those files), ``missing_keypoints`` every keypoint scored
  as missing (parse failures + the keypoints of those persons).
  """
  k = len(names)
  missing = missing_mask(entries, k)
  broken = np.array([bool(e.get("image_error")) for e in entries], bool).reshape(-1)
  out: dict[str, Any] = {"num_persons": len(entries), **missing_counts(
      missing, np.ones_like(missing), broken,
      [str(records[e["index"]].image_path) for e, b in zip(entries, broken) if b])}
  scores = np.array([[kp[2] for kp in e["keypoints"]] for e in entries]).reshape(missing.shape)
  columns: dict[str, Any] = {"parse_failures": (missing & ~broken[:, None]).sum(0).astype(float),
                             "missing": missing.sum(0).astype(float),
                             "mean_score": scores.mean(0) if len(entries) else []}
  if coco_gt and sigmas is not None and len(sigmas) == len(names):
    cats = category_ids(coco_gt, records)
    preds = [_coco_entry(e, cats) for e in entries]
    partial = len({e["index"] for e in entries}) < len(records)
    image_ids = sorted({int(records[e["index"]].image_id) for e in entries}) if partial else None
    out["ap_protocol"] = metrics.ap_protocol(records[0].dataset)
    out["coco"] = metrics.coco_keypoint_ap(coco_gt, preds, sigmas, image_ids=image_ids,
                                           category_ids=sorted(set(cats.values())),
                                           protocol=out["ap_protocol"])
  recs = [records[e["index"]] for e in entries]
  check_protocol(recs, mpii_box_pck)
  if has_gt and recs and recs[0].keypoints.shape[0] == len(names):
    pred = np.array([np.array(e["keypoints"])[:, :2] for e in entries])
    gt = np.stack([r.keypoints[:, :2] for r in recs])
    vis = np.stack([r.keypoints[:, -1] > 0 for r in recs])
    pck = metrics.box_pck(pred, gt, vis, np.stack([r.box for r in recs]), missing=missing)
    out["pck"] = {k: v for k, v in pck.items() if k != "per_keypoint"}
    columns.update(pck["per_keypoint"])
    if all(r.head_box is not None for r in recs) and len(names) == 16:
      pckh = metrics.pckh(pred, gt, vis, np.stack([r.head_box for r in recs]), pckh_variant,
                          missing=missing)
      out["pckh"] = {k: v for k, v in pckh.items() if k != "per_keypoint"}
      columns.update(pckh["per_keypoint"])
    if all(r.keypoints_3d is not None and r.camera is not None for r in recs) and \
        "depth_rel" in entries[0]:
      cam = np.stack([_camera_3d(r, np.array(e["keypoints"])[:, :2], np.array(e["depth_rel"]),
                                 root)
                      for r, e in zip(recs, entries)])
      gt3 = np.stack([r.keypoints_3d[:, :3] for r in recs])
      actions = [r.extra.get("action") or metrics.h36m_action(r.image_path) for r in recs]
      mp = metrics.mpjpe(cam, gt3, actions, root=root, missing=missing)
      columns["MPJPE"] = mp.pop("per_keypoint_MPJPE")
      out["mpjpe"] = mp
  out["per_keypoint"] = metrics.per_keypoint_table(names, columns)
  return out


# ---------------------------------------------------------------------------
# The run.


def run(config: Any, out_dir: str, *, checkpoint: str = "", dataset: str = "",
        max_persons: Optional[int] = None, pckh_variant: str = "standard",
        mpii_box_pck: bool = False, progress: bool = True,
        model_params: Optional[tuple[Any, Any]] = None,
        tokenizer: Any = None, step: Optional[int] = None,
        model_loader: Optional[Callable[..., tuple[Any, Any, Any]]] = None) -> dict[str, Any]:
  """Evaluates one checkpoint on one dataset; returns the metrics dict.

  When ``out_dir`` already holds the outputs of a run with the same provenance
  (:func:`eval_provenance`), nothing is recomputed (the saved metrics are returned);
  outputs or partial predictions made otherwise are discarded (logged).

  Args:
    mpii_box_pck: (or ``config.decode.mpii_box_pck``) MPII without head boxes reports
      box PCK (else ConfigError, before any decoding).
    step: the checkpoint step to evaluate (default: its latest).
    model_params: (model, params) to use instead of loading (sweeps, tests; the caller
      vouches that they are ``checkpoint``'s at ``step``).
    tokenizer: skips loading it.
    model_loader: ``(config, checkpoint, step) -> (config, model, params)`` called only
      when something has to be decoded (default :func:`load_model`).
  """
  from tqdm import tqdm

  from kptjax.inference import decode
  from kptjax.keypoints import get_spec

  config = resolve_config(config, checkpoint)
  step = checkpoint_step(checkpoint) if step is None else step
  records = load_eval_records(config, dataset)
  if not len(records):
    raise errors.DataError(getattr(records, "source", dataset), "no persons to evaluate")
  record = eval_provenance(config, records, checkpoint=checkpoint, dataset=dataset, step=step,
                           evaluation={"max_persons": max_persons,
                                       "pckh_variant": pckh_variant})
  saved = saved_result(out_dir, record)
  if saved is not None:
    return saved
  os.makedirs(out_dir, exist_ok=True)
  indices = list(range(len(records)))[:max_persons]
  mpii_box_pck = mpii_box_pck or bool(config.decode.get("mpii_box_pck", False))
  check_protocol(records, mpii_box_pck)
  spec_names = {records[i].spec for i in indices}
  if len(spec_names) != 1:
    raise errors.ConfigError(f"evaluate asks one keypoint spec per run; the dataset has "
                             f"{sorted(spec_names)}")
  specs = getattr(records, "specs", {}) or {}
  spec = specs.get(records[0].spec) or get_spec(records[0].spec)
  if model_params is None:
    config, *model_params = (model_loader or load_model)(config, checkpoint, step)
  model, params = model_params
  tokenizer = tokenizer or load_tokenizer(config)
  descriptions = spec.descriptions if config.data.use_descriptions else [None] * len(spec.names)
  localizer = decode.Localizer(config, model, params, tokenizer, spec.names, descriptions,
                               subject=getattr(spec, "subject", "person"))
  is_3d = localizer.count == 3

  partial_path = os.path.join(out_dir, PARTIAL)
  # Partial predictions hold persons, whichever max_persons asked for them.
  partial_record = {k: v for k, v in record.items() if k != "evaluation"}
  done = _read_partial(partial_path, partial_record)
  todo = [i for i in indices if i not in done]
  batch_size = int(config.decode.batch_persons)
  t0, decoded, first = time.time(), 0, None
  with open(partial_path, "a" if done else "w") as partial, \
      tqdm(total=len(indices), initial=len(indices) - len(todo), disable=not progress,
           desc=f"evaluate {os.path.basename(out_dir.rstrip('/'))}", unit="person") as bar:
    if not done:
      partial.write(json.dumps({"provenance": partial_record}) + "\n")
    for batch in decode_persons(localizer, records, iter_crops(config, records, todo),
                                batch_size):
      for entry in batch:
        done[entry["index"]] = entry
        partial.write(json.dumps(entry) + "\n")
      partial.flush()
      decoded += len(batch)
      bar.update(len(batch))
      if first is None:                      # the first batch includes the compilation
        first = (decoded, time.time() - t0)
  wall = time.time() - t0
  if first and decoded > first[0]:
    speed = (decoded - first[0]) / max(wall - first[1], 1e-9)
  else:
    speed = decoded / wall if decoded and wall > 0 else None

  entries = [done[i] for i in indices]
  source = getattr(records, "source", "")
  coco_gt = source if str(source).endswith(".json") and not is_3d and \
      records[0].dataset not in ("mpii", "h36m", "mp100") else None
  has_gt = not (dataset and "det_file=" in dataset) and not config.data.eval.get("det_file")
  result = compute_metrics(records, entries, spec.names, coco_gt=coco_gt, sigmas=spec.sigmas,
                           pckh_variant=pckh_variant, has_gt=has_gt,
                           root=getattr(spec, "root_index", None) or 0,
                           mpii_box_pck=mpii_box_pck)
  result.update({
      "dataset": dataset or dict(config.data.eval), "checkpoint": checkpoint,
      "checkpoint_step": step, "spec": spec.name,
      "decode": {"max_new_tokens": localizer.max_new_tokens, "constrained": localizer.constrained,
                 "share_prefix": localizer.share_prefix, "batch_persons": batch_size},
      "wall_s": wall, "first_batch_s": first[1] if first else None,
      "persons_per_s": speed,   # after the first batch (compilation) when there are more
      "provenance": record,
  })
  root = getattr(spec, "root_index", None) or 0
  predictions_path = os.path.join(out_dir, PREDICTIONS)
  storage.write_json_atomic(predictions_path, predictions_file(
      records, entries, is_3d, category_ids(coco_gt, records), root))
  storage.write_json_atomic(os.path.join(out_dir, PREDICTIONS_PROVENANCE),
                    {"provenance": record, "predictions": PREDICTIONS,
                     "sha256": _sha256_file(predictions_path)})
  storage.write_json_atomic(os.path.join(out_dir, METRICS), result)
  os.remove(partial_path)
  return result


def make_train_evaluator(config: Any, model: Any, mesh: Any = None):
  """The periodic-evaluation hook of ``kptjax.train``:
  ``config.train.evaluator = 'kptjax.evaluate:make_train_evaluator'``.

  Decodes the first ``config.decode.eval_persons`` persons of ``config.data.eval``
  (0 = all; crops made once) with the current params and returns scalars: PCK@0.05/0.1/
  0.2, COCO AP (COCO-format data), and the parse-failure rate.
  """
  del mesh   # params arrive sharded; the decoder's jit follows their shardings
  from kptjax.inference import decode
  from kptjax.keypoints import get_spec
  tokenizer = load_tokenizer(config)
  records = load_eval_records(config)
  limit = int(config.decode.get("eval_persons", 0)) or len(records)
  indices = list(range(min(limit, len(records))))
  items = list(iter_crops(config, records, indices))
  spec = (getattr(records, "specs", {}) or {}).get(records[0].spec) or get_spec(records[0].spec)
  descriptions = spec.descriptions if config.data.use_descriptions else [None] * len(spec.names)
  source = str(getattr(records, "source", ""))
  coco_gt = source if source.endswith(".json") and records[0].dataset not in (
      "mpii", "h36m", "mp100") else None
  state: dict[str, Any] = {}

  def eval_fn(train_state: Any, step: int) -> dict[str, float]:
    del step
    if "localizer" not in state:
      state["localizer"] = decode.Localizer(config, model, train_state.params, tokenizer,
                                            spec.names, descriptions,
                                            subject=getattr(spec, "subject", "person"))
    localizer = state["localizer"]
    localizer.decoder.params = train_state.params
    entries = [e for batch in decode_persons(localizer, records, iter(items),
                                             int(config.decode.batch_persons)) for e in batch]
    result = compute_metrics(records, entries, spec.names, coco_gt=coco_gt, sigmas=spec.sigmas,
                             has_gt=not config.data.eval.get("det_file"),
                             mpii_box_pck=bool(config.decode.get("mpii_box_pck", False)))
    out = {"parse_failure_rate": result["parse_failure_rate"]}
    for k in ("PCK@0.05", "PCK@0.1", "PCK@0.2"):
      if k in result.get("pck", {}):
        out[k] = result["pck"][k]
    if "coco" in result:
      out["AP"] = result["coco"]["AP"]
    return out

  return eval_fn


def summary_lines(result: dict[str, Any]) -> list[str]:
  """A few human-readable lines of the headline numbers."""
  lines = [f"persons {result['num_persons']}, parse failures {result['parse_failures']}"
           f"/{result['num_answers']}, missing keypoints {result.get('missing_keypoints', 0)}, "
           f"unreadable images {len(result.get('unreadable_images', []))}"]
  for key in ("coco", "pck", "pckh", "mpjpe"):
    if key in result:
      vals = {k: v for k, v in result[key].items() if isinstance(v, (int, float))}
      lines.append(f"{key}: " + ", ".join(f"{k} {v:.4g}" for k, v in list(vals.items())[:8]))
  return lines


# ---------------------------------------------------------------------------
# CLI.

def _define_flags() -> None:
  """CLI flags (defined only when run as a program, so importing this module is free)."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).")
  flags.DEFINE_string("checkpoint", "", "kptjax workdir or checkpoints dir.")
  flags.DEFINE_string("dataset", "", "'source,key=value,...' (default: config.data.eval).")
  flags.DEFINE_string("out", None, "Output directory.")
  flags.DEFINE_string("workdir", None, "Alias of --out.")
  flags.DEFINE_integer("max_persons", None, "Evaluate only the first N persons.")
  flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
  flags.DEFINE_enum("pckh_variant", "standard", ["standard", "locllm"],
                    "Joints in the PCKh mean (metrics.PCKH_MEAN_EXCLUDE).")
  flags.DEFINE_bool("mpii_box_pck", False, "MPII without head boxes: report box PCK only "
                    "(default: refuse, PCKh needs headbox_file).")
  flags.mark_flag_as_required("config")


def main(argv: Sequence[str]) -> None:
  del argv
  f = flags.FLAGS
  out = f.out or f.workdir
  if not out:
    raise app.UsageError("--out (or --workdir) is required")
  try:
    result = run(f.config, out, checkpoint=f.checkpoint, dataset=f.dataset,
                 max_persons=f.max_persons, pckh_variant=f.pckh_variant, step=f.step,
                 mpii_box_pck=f.mpii_box_pck)
  except errors.KptjaxError as e:
    raise SystemExit(f"error: {e}") from None
  for line in summary_lines(result):
    print(line)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
