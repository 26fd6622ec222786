r"""Checkpoint x dataset -> ``predictions.json`` + ``metrics.json``.

    python -m kptjax.evaluate --config configs/tiny.py --checkpoint WORKDIR \
        --dataset coco,ann_file=/data/coco/person_keypoints_val2017.json,image_root=/data/coco/val2017 \
        --out results/coco

``--dataset`` is a source name of ``kptjax.data.sources.read_dataset`` followed by its
keyword arguments (``ann_file``, ``image_root``, ``det_file``, ``headbox_file``,
``camera_file``, ...); without it the config's ``data.eval`` set is used.

Outputs in ``--out`` (each written to a temporary file, then renamed: never half-written):
  predictions.json  2D: COCO results format, one entry per person
                    {image_id, category_id, keypoints [x, y, score] * K, score};
                    3D: a list of {image_id, ann_id, keypoints [x, y, score] * K (pixels),
                    keypoints_3d [[x, y, z] mm, camera coordinates, root depth from the
                    ground truth as in LocLLM] * K, depth_rel [mm] * K, score}.
  metrics.json      every metric that applies (COCO AP/AR, PCK, PCKh, MPJPE), the
                    per-keypoint table, parse failures, speed.
Resumable: finished persons are appended to ``predictions.partial.jsonl`` as they are
decoded and skipped on restart; when both final files exist the run is skipped.

Person score = mean keypoint score (LocLLM) x the box score (1 for ground-truth boxes).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Iterator, Optional, Sequence

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from kptjax import errors, metrics, parsing

PREDICTIONS = "predictions.json"
METRICS = "metrics.json"
PARTIAL = "predictions.partial.jsonl"


# ---------------------------------------------------------------------------
# Files.


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes JSON to ``path + '.tmp'`` then renames it over ``path``."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def is_done(out_dir: str) -> bool:
  """Both final files exist: the evaluation is finished."""
  return all(os.path.exists(os.path.join(out_dir, n)) for n in (PREDICTIONS, METRICS))


def _read_partial(path: str) -> dict[int, dict]:
  """Finished persons by index; a truncated last line (a crash mid-write) is dropped."""
  done = {}
  if not os.path.exists(path):
    return done
  with open(path) as f:
    for line in f:
      try:
        item = json.loads(line)
      except json.JSONDecodeError:
        break
      done[int(item["index"])] = item
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


def load_model(config: Any, checkpoint: str = "") -> tuple[Any, Any, Any]:
  """(config, VLM, params) for inference.

  From a kptjax checkpoint (a training workdir or its ``checkpoints`` dir; the model
  section is taken from the workdir's ``model_config.json`` when present, as training
  resolved it from the Hugging Face dirs), else from the Hugging Face dirs in
  ``config.checkpoints``, else random weights (logged).

  Raises:
    CheckpointError: the checkpoint is unreadable or lacks some of the model's params.
  """
  import jax
  import flax.linen as nn
  import ml_collections
  from kptjax.models import vlm

  def with_model(model_config):
    c = ml_collections.ConfigDict(config.to_dict())
    c.model = ml_collections.ConfigDict(dict(model_config))
    return c.lock()

  if checkpoint:
    from kptjax import checkpoint as ckpt_lib
    if not os.path.exists(checkpoint):
      raise errors.CheckpointError(f"{checkpoint}: no such checkpoint directory")
    model_file = _model_config_file(checkpoint)
    if model_file:
      with open(model_file) as f:
        config = with_model(json.load(f))
    abstract = nn.meta.unbox(vlm.abstract_params(config.model))
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: sharding, abstract)
    params, missing = ckpt_lib.load_params(checkpoint, abstract, shardings)
    if missing:
      raise errors.CheckpointError(
          f"{checkpoint}: {len(missing)} params of the model are not in the checkpoint "
          f"(is --config the one it was trained with?): {missing[:5]}")
    return config, vlm.VLM(config.model), params
  if config.checkpoints.llm_dir or config.checkpoints.vit_dir:
    from kptjax import convert
    model_config, params = convert.load_vlm(config)
    config = with_model(model_config.to_dict())
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
  from kptjax.data.sources import read_dataset
  name, *rest = [p.strip() for p in dataset.split(",") if p.strip()]
  for part in rest:
    if "=" not in part:
      raise errors.ConfigError(f"--dataset: expected key=value after the source name, "
                               f"got '{part}'")
  return read_dataset(name, **pipeline._parse_options(",".join(rest)))  # pylint: disable=protected-access


def iter_crops(config: Any, records: Sequence[Any], indices: Sequence[int]) -> Iterator[dict]:
  """Eval elements of ``records[i]`` for i in ``indices``, in order, made by the eval
  pipeline's transform (``kptjax.data.pipeline.EvalTransform``: same crop as training,
  no augmentation): {'index', 'image' f32[S, S, 3] normalized, 'affine_inv' f32[2, 3], ...}.
  Images are decoded by a few threads ahead of the decoder."""
  from concurrent.futures import ThreadPoolExecutor
  from kptjax.data import pipeline
  transform = pipeline.EvalTransform(config, records)
  with ThreadPoolExecutor(max_workers=4) as pool:
    yield from pool.map(transform, indices)


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
  so the decoder compiles once.
  """
  for batch in _batches(items, batch_size):
    pad = batch + [batch[0]] * (batch_size - len(batch))
    loc = localizer(np.stack([b["image"] for b in pad]), np.stack([b["affine_inv"] for b in pad]))
    yield [_person_entry(records[int(item["index"])], int(item["index"]), loc, i)
           for i, item in enumerate(batch)]


# ---------------------------------------------------------------------------
# Predictions -> metrics.


def _person_entry(rec: Any, index: int, loc: parsing.Localization, i: int) -> dict:
  kps = np.concatenate([loc.keypoints[i], loc.scores[i][:, None]], axis=1)
  entry = {"index": int(index), "image_id": int(rec.image_id), "ann_id": int(rec.ann_id),
           "keypoints": kps.round(3).tolist(),
           "score": float(loc.person_scores[i]) * float(rec.score),
           "ok": loc.ok[i].tolist(), "texts": loc.texts[i]}
  if loc.depth is not None:
    entry["depth_rel"] = loc.depth[i].round(3).tolist()
  return entry


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


def predictions_file(records: Sequence[Any], entries: Sequence[dict], is_3d: bool,
                     categories: Optional[dict[int, int]] = None, root: int = 0) -> list[dict]:
  """The public predictions.json content (see the module docstring).

  categories: {ann_id: category_id} for results on ground-truth boxes (default 1).
  """
  out, categories = [], categories or {}
  for e in entries:
    if not is_3d:
      out.append(metrics.coco_result(e["image_id"], np.array(e["keypoints"]), e["score"],
                                     categories.get(int(e["ann_id"]), 1)))
      continue
    rec = records[e["index"]]
    kp = np.array(e["keypoints"])
    cam = _camera_3d(rec, kp[:, :2], np.array(e["depth_rel"]), root)
    out.append({"image_id": e["image_id"], "ann_id": e["ann_id"],
                "keypoints": kp.reshape(-1).round(3).tolist(),
                "keypoints_3d": cam.round(2).tolist(), "depth_rel": e["depth_rel"],
                "score": e["score"]})
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
  """
  ok = np.array([e["ok"] for e in entries], bool).reshape(len(entries), -1)
  missing = np.array([np.isin(np.arange(len(names)), e.get("missing", [])) for e in entries],
                     bool).reshape(len(entries), len(names))
  out: dict[str, Any] = {
      "num_persons": len(entries), "num_answers": int(ok.size),
      "parse_failures": int((~ok).sum()),
      "parse_failure_rate": float((~ok).mean()) if ok.size else 0.0,
  }
  scores = np.array([[k[2] for k in e["keypoints"]] for e in entries]).reshape(ok.shape)
  columns: dict[str, Any] = {"parse_failures": (~ok).sum(0).astype(float),
                             "mean_score": scores.mean(0) if len(entries) else []}
  if coco_gt and sigmas is not None and len(sigmas) == len(names):
    cats = category_ids(coco_gt, records)
    preds = [metrics.coco_result(e["image_id"], np.array(e["keypoints"]), e["score"],
                                 cats[int(records[e["index"]].ann_id)], missing=m)
             for e, m in zip(entries, missing)]
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
        tokenizer: Any = None) -> dict[str, Any]:
  """Evaluates one checkpoint on one dataset; returns the metrics dict.

  When ``out_dir`` already holds both outputs, nothing is recomputed (the saved
  metrics are returned). ``model_params`` / ``tokenizer`` skip loading (sweeps, tests).
  ``mpii_box_pck`` (or ``config.decode.mpii_box_pck``): MPII without head boxes reports
  box PCK (else ConfigError, before any decoding).
  """
  metrics_path = os.path.join(out_dir, METRICS)
  if is_done(out_dir):
    logging.info("%s exists: skipping", metrics_path)
    with open(metrics_path) as f:
      return json.load(f)
  os.makedirs(out_dir, exist_ok=True)
  from tqdm import tqdm
  from kptjax import decode
  from kptjax.keypoints import get_spec

  records = load_eval_records(config, dataset)
  if not len(records):
    raise errors.DataError(getattr(records, "source", dataset), "no persons to evaluate")
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
    config, *model_params = load_model(config, checkpoint)
  model, params = model_params
  tokenizer = tokenizer or load_tokenizer(config)
  descriptions = spec.descriptions if config.data.use_descriptions else [None] * len(spec.names)
  localizer = decode.Localizer(config, model, params, tokenizer, spec.names, descriptions,
                               subject=getattr(spec, "subject", "person"))
  is_3d = localizer.count == 3

  partial_path = os.path.join(out_dir, PARTIAL)
  done = _read_partial(partial_path)
  todo = [i for i in indices if i not in done]
  batch_size = int(config.decode.batch_persons)
  t0, decoded, first = time.time(), 0, None
  with open(partial_path, "a") as partial, \
      tqdm(total=len(indices), initial=len(indices) - len(todo), disable=not progress,
           desc=f"evaluate {os.path.basename(out_dir.rstrip('/'))}", unit="person") as bar:
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
      "dataset": dataset or dict(config.data.eval), "checkpoint": checkpoint, "spec": spec.name,
      "decode": {"max_new_tokens": localizer.max_new_tokens, "constrained": localizer.constrained,
                 "share_prefix": localizer.share_prefix, "batch_persons": batch_size},
      "wall_s": wall, "first_batch_s": first[1] if first else None,
      "persons_per_s": speed,   # after the first batch (compilation) when there are more
  })
  root = getattr(spec, "root_index", None) or 0
  write_json_atomic(os.path.join(out_dir, PREDICTIONS), predictions_file(
      records, entries, is_3d, category_ids(coco_gt, records), root))
  write_json_atomic(metrics_path, result)
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
  from kptjax import decode
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
           f"/{result['num_answers']}"]
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
                 max_persons=f.max_persons, pckh_variant=f.pckh_variant,
                 mpii_box_pck=f.mpii_box_pck)
  except errors.KptjaxError as e:
    raise SystemExit(f"error: {e}") from None
  for line in summary_lines(result):
    print(line)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
