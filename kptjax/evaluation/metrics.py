"""Keypoint metrics: OKS AP/AR as each benchmark's own evaluator computes it (COCO,
Human-Art, OCHuman, AP-10K: pycocotools; CrowdPose: faster-coco-eval's port of
xtcocotools' 'keypoints_crowd'; AI Challenger: mmpose's xtcocotools setting), PCKh
(MPII), PCK (box-normalized; per instance for MP-100), MPJPE / PA-MPJPE (Human3.6M),
and per-keypoint tables.

Units: 2D coordinates in original-image pixels; 3D coordinates in millimetres.
Every function takes numpy arrays and returns plain Python floats / dicts so the
results go straight into ``metrics.json``.

Missing answers (the boundary every caller keeps): a prediction is ``pred float[N, K, D]``
plus ``missing bool[N, K]``; the values of missing entries are never read. A missing
keypoint is never a PCK / PCKh hit (it still counts in the denominator), never part of
an MPJPE mean (it is counted instead) and never matches in OKS (its OKS term is exactly
0, see :func:`coco_keypoint_ap`). A non-finite value that is not marked missing is
refused (``DataError`` naming the field).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from kptjax import errors
from kptjax.data.sources.h36m import frame_action

COCO_AP_NAMES = ("AP", "AP50", "AP75", "APM", "APL", "AR", "AR50", "AR75", "ARM", "ARL")
CROWDPOSE_AP_NAMES = ("AP", "AP50", "AP75", "AR", "AR50", "AR75", "AP(E)", "AP(M)", "AP(H)")
# The OKS AP protocol of each COCO-format benchmark (README "Evaluation" has the table).
AP_PROTOCOLS = {"coco": COCO_AP_NAMES, "aic": COCO_AP_NAMES, "crowdpose": CROWDPOSE_AP_NAMES}
PCK_THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.25)
PCKH_SC_BIAS = 0.6
# xtcocotools with use_area=False (mmpose's CrowdPose and AIC setting) uses 0.53 x box
# area as the object scale, for OKS and for the area ranges alike.
AREA_FROM_BOX = 0.53
# Where a missing keypoint goes before the evaluator sees it: exp(-d^2 / (2 s^2 k^2))
# underflows to exactly 0 for every object smaller than ~1e13 px^2.
MISSING_FAR_PX = 1e9


def ap_protocol(dataset: str) -> str:
  """The OKS AP protocol of a dataset name ('crowdpose', 'aic'; everything else 'coco')."""
  return dataset if dataset in AP_PROTOCOLS else "coco"


# ---------------------------------------------------------------------------
# The metric boundary.


def answered_mask(pred: np.ndarray, missing: Optional[np.ndarray], field: str = "pred"
                  ) -> np.ndarray:
  """bool[N, K]: entries with an answer. Refuses non-finite values not marked missing.

  Args:
    pred: float[N, K, D] predictions.
    missing: optional bool[N, K] entries without an answer (their values are ignored).
    field: the argument's name, for the error.
  Raises:
    DataError: ``missing`` has the wrong shape, or an answered entry is NaN / inf.
  """
  pred = np.asarray(pred, np.float64)
  shape = pred.shape[:2]
  if missing is None:
    answered = np.ones(shape, bool)
  else:
    missing = np.asarray(missing, bool)
    if missing.shape != shape:
      raise errors.DataError("metrics", f"missing has shape {missing.shape}, {field} has "
                             f"{pred.shape}", field="missing", expected=f"bool{list(shape)}")
    answered = ~missing
  bad = answered & ~np.isfinite(pred).all(-1)
  if bad.any():
    n, k = np.argwhere(bad)[0]
    raise errors.DataError(
        "metrics", f"{int(bad.sum())} non-finite predictions not marked missing (first: "
        f"person {n}, keypoint {k}: {pred[n, k].tolist()})", field=field,
        expected="finite numbers, or the entry marked in `missing`")
  return answered


# ---------------------------------------------------------------------------
# OKS AP (COCO and its relatives).


def _read_gt(gt: Any) -> dict:
  """A deep copy of the ground truth as a COCO-format dict (from a path or a dict)."""
  if isinstance(gt, (str, os.PathLike)):
    with open(gt, encoding="utf-8") as f:
      return json.load(f)
  if hasattr(gt, "dataset"):          # a pycocotools / faster-coco-eval COCO object
    gt = gt.dataset
  return copy.deepcopy(dict(gt))


def load_coco_gt(gt: Any):
  """A pycocotools ``COCO`` from a path, a COCO-format dict or a ``COCO`` (unchanged)."""
  from pycocotools.coco import COCO
  if isinstance(gt, COCO):
    return gt
  data = _read_gt(gt)
  data.setdefault("info", {})
  data.setdefault("licenses", [])
  coco = COCO()
  coco.dataset = data
  with contextlib.redirect_stdout(io.StringIO()):
    coco.createIndex()
  return coco


def coco_categories(gt: Any) -> dict[str, int]:
  """{category name: id} of a COCO-format ground truth (path or dict)."""
  data = gt if isinstance(gt, Mapping) else _read_gt(gt)
  return {str(c.get("name")): int(c["id"]) for c in data.get("categories", [])}


def _split(data: dict, image_ids: Optional[Sequence[int]],
           category_ids: Optional[Sequence[int]]) -> dict:
  """The ground truth restricted to a split: its categories (and the images holding
  one of them, unless the split has every category) and/or the given images."""
  all_cats = {int(c["id"]) for c in data.get("categories", [])}
  images = {int(i["id"]) for i in data.get("images", [])}
  if category_ids is not None and set(map(int, category_ids)) != all_cats:
    cats = set(map(int, category_ids))
    data["categories"] = [c for c in data["categories"] if int(c["id"]) in cats]
    data["annotations"] = [a for a in data["annotations"] if int(a["category_id"]) in cats]
    images = {int(a["image_id"]) for a in data["annotations"]}
  if image_ids is not None:
    images &= set(map(int, image_ids))
  if images != {int(i["id"]) for i in data.get("images", [])}:
    data["images"] = [i for i in data["images"] if int(i["id"]) in images]
    data["annotations"] = [a for a in data["annotations"] if int(a["image_id"]) in images]
  return data


def _tool_results(results: Sequence[Mapping[str, Any]], data: dict, num_keypoints: int,
                  drop_unscored: bool) -> list[dict]:
  """The results the evaluator sees: validated, in the split, missing keypoints moved.

  A keypoint listed in an entry's ``missing`` goes to (MISSING_FAR_PX, MISSING_FAR_PX)
  with score 0, so its OKS term is exactly 0 for every ground truth; when any entry has
  one, every entry carries a ``bbox`` of its answered keypoints, which the evaluator's
  ``loadRes`` then uses for the detection's area (the box it computes from keypoints
  alone), so the far point does not inflate it. ``drop_unscored``: leave out entries
  whose keypoint scores are all 0, as xtcocotools' ``_prepare`` does.
  """
  images = {int(i["id"]) for i in data["images"]}
  cats = {int(c["id"]) for c in data["categories"]}
  out, any_missing = [], False
  for i, r in enumerate(results):
    where = f"results[{i}]"
    try:
      kp = np.asarray(r.get("keypoints", []), np.float64)
      listed = [int(k) for k in r.get("missing", []) or []]
    except (TypeError, ValueError) as e:
      raise errors.DataError("results", f"not numbers: {e}", field=f"{where}.keypoints",
                             expected="3K numbers and a list of keypoint indices") from None
    if kp.size != 3 * num_keypoints:
      raise errors.DataError("results", f"{kp.size} keypoint values", field=f"{where}.keypoints",
                             expected=f"{3 * num_keypoints} (x, y, score per keypoint)")
    kp = kp.reshape(-1, 3)
    missing = np.zeros(num_keypoints, bool)
    for k in listed:
      if not 0 <= k < num_keypoints:
        raise errors.DataError("results", f"keypoint {k} out of range", field=f"{where}.missing",
                               expected=f"indices in [0, {num_keypoints})")
      missing[k] = True
    answered = answered_mask(kp[None], missing[None], f"{where}.keypoints")[0]
    score = float(r.get("score", np.nan))
    if not np.isfinite(score):
      raise errors.DataError("results", f"score {r.get('score')!r}", field=f"{where}.score",
                             expected="a finite number")
    image_id, category_id = int(r["image_id"]), int(r.get("category_id", 1))
    if image_id not in images or category_id not in cats:
      continue                       # outside the split
    kp[~answered] = (MISSING_FAR_PX, MISSING_FAR_PX, 0.0)
    if drop_unscored and not (kp[:, 2] > 0).any():
      continue
    entry = {"image_id": image_id, "category_id": category_id,
             "keypoints": kp.reshape(-1).tolist(), "score": score}
    xy = kp[answered, :2]
    if len(xy):
      x0, y0 = xy.min(0)
      x1, y1 = xy.max(0)
      entry["bbox"] = [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]
    else:
      entry["bbox"] = [0.0, 0.0, 0.0, 0.0]
    any_missing |= bool((~answered).any())
    out.append(entry)
  if not any_missing:
    for entry in out:
      del entry["bbox"]              # the evaluator computes the same box from keypoints
  return out


def _check_crowd_index(data: dict, source: Any) -> None:
  for i, img in enumerate(data["images"]):
    value = img.get("crowdIndex")
    if not isinstance(value, (int, float)) or not np.isfinite(value):
      raise errors.DataError(source, f"crowdIndex {value!r} (CrowdPose's AP(E/M/H) splits the "
                             "images by it)", field=f"images[{i}].crowdIndex",
                             record=img.get("id"), expected="a finite number")


def coco_keypoint_ap(gt: Any, results: Sequence[Mapping[str, Any]],
                     sigmas: Optional[Sequence[float]] = None,
                     image_ids: Optional[Sequence[int]] = None,
                     category_ids: Optional[Sequence[int]] = None,
                     protocol: str = "coco") -> dict[str, float]:
  """OKS AP/AR of ``results`` against ``gt``, computed by the benchmark's own evaluator.

  protocol:
    'coco'       pycocotools ``COCOeval(iouType='keypoints')``, the annotations' ``area``
                 (COCO, Human-Art, OCHuman, AP-10K).
    'aic'        mmpose's AI Challenger setting, xtcocotools ``COCOeval('keypoints',
                 use_area=False)``: the object scale is 0.53 x box area (``AREA_FROM_BOX``)
                 and results whose keypoint scores are all 0 are ignored, as xtcocotools
                 does; run through pycocotools, which then computes what xtcocotools does.

  Every protocol: an annotation without ``iscrowd`` is not a crowd (xtcocotools' default).
    'crowdpose'  faster-coco-eval ``COCOeval_faster(iouType='keypoints_crowd',
                 use_area=False)``, xtcocotools' port of crowdposetools: AP, AP50, AP75,
                 AR, AR50, AR75 and AP(E), AP(M), AP(H) over the images whose
                 ``crowdIndex`` is < 0.2, < 0.8, >= 0.8 (the tool rounds these three to
                 4 decimals and gives -1 for an empty group); results whose keypoint
                 scores are all 0 are ignored, as xtcocotools does.

  Args:
    gt: COCO-format ground truth (path, dict or ``COCO``).
    results: COCO results: dicts with ``image_id``, ``category_id``, ``keypoints`` (3K
      floats: x, y, score), ``score``, and optionally ``missing`` (indices of keypoints
      without an answer; their values are not read). Missing keypoints never match:
      before the evaluator sees them they are moved to ``MISSING_FAR_PX`` (OKS term
      exactly 0) and the entry's detection box is that of its answered keypoints.
    sigmas: float[K] per-keypoint OKS sigmas (the keypoint spec's); None = COCO-17
      (required for 'aic' and 'crowdpose').
    image_ids: evaluate only these images (default: every image of ``gt``, whether or
      not anything was detected in it).
    category_ids: evaluate only these categories (a split: the images holding one of
      them; default: all).
    protocol: one of ``AP_PROTOCOLS``.
  Returns:
    {name: value} for the protocol's names (``AP_PROTOCOLS[protocol]``), in [0, 1] (-1
    where the evaluator has no ground truth); all 0 when no result is left.
  Raises:
    DataError: a result that is malformed or non-finite (and not marked missing), a
      result on an image or in a category not in ``gt``, a COCO-protocol annotation
      without a finite ``area``, a CrowdPose image without ``crowdIndex``.
  """
  if protocol not in AP_PROTOCOLS:
    raise errors.ConfigError(f"AP protocol must be one of {sorted(AP_PROTOCOLS)}, got "
                             f"{protocol!r}")
  names = AP_PROTOCOLS[protocol]
  source = gt if isinstance(gt, (str, os.PathLike)) else "ground truth"
  data = _read_gt(gt)
  for key in ("images", "annotations", "categories"):
    data.setdefault(key, [])
  known_images = {int(i["id"]) for i in data["images"]}
  known_cats = {int(c["id"]) for c in data["categories"]}
  for i, r in enumerate(results):
    if r.get("image_id") not in known_images:
      raise errors.DataError("results", f"image_id {r.get('image_id')!r} is not in {source}",
                             field=f"results[{i}].image_id")
    if r.get("category_id", 1) not in known_cats:
      raise errors.DataError("results", f"category_id {r.get('category_id')!r} is not in "
                             f"{source}", field=f"results[{i}].category_id")
  if sigmas is None and protocol != "coco":
    raise errors.ConfigError(f"the {protocol} AP needs the keypoint spec's OKS sigmas")
  num_keypoints = 17 if sigmas is None else len(sigmas)
  data = _split(data, image_ids, category_ids)
  if protocol == "coco":
    for ann in data["annotations"]:
      if not isinstance(ann.get("area"), (int, float)) or not np.isfinite(ann["area"]):
        raise errors.DataError(source, f"area {ann.get('area')!r}: COCO's OKS scale (a "
                               "file without areas is CrowdPose's or AIC's protocol)",
                               field="annotations[].area", record=ann.get("id"),
                               expected="a finite number")
  for ann in data["annotations"]:
    ann.setdefault("iscrowd", 0)       # xtcocotools' default; pycocotools would raise
  tool_results = _tool_results(results, data, num_keypoints, drop_unscored=protocol != "coco")
  if not tool_results:
    return {k: 0.0 for k in names}
  if protocol == "crowdpose":
    _check_crowd_index(data, source)
    return dict(zip(names, _faster_crowd_eval(data, tool_results, sigmas)))
  if protocol == "aic":
    for ann in data["annotations"]:
      ann["area"] = ann["bbox"][2] * ann["bbox"][3] * AREA_FROM_BOX
  return dict(zip(names, _pycocotools_eval(data, tool_results, sigmas)))


def _pycocotools_eval(data: dict, results: list[dict], sigmas: Optional[Sequence[float]]
                      ) -> list[float]:
  from pycocotools.cocoeval import COCOeval
  coco_gt = load_coco_gt(data)
  with contextlib.redirect_stdout(io.StringIO()):
    ev = COCOeval(coco_gt, coco_gt.loadRes(results), "keypoints")
    if sigmas is not None:
      ev.params.kpt_oks_sigmas = np.asarray(sigmas, np.float64)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return [float(v) for v in ev.stats]


def _faster_crowd_eval(data: dict, results: list[dict], sigmas: Sequence[float]) -> list[float]:
  from faster_coco_eval import COCO, COCOeval_faster
  coco_gt = COCO(data, print_function=lambda *a, **k: None)
  ev = COCOeval_faster(coco_gt, coco_gt.loadRes(results), "keypoints_crowd",
                       kpt_oks_sigmas=list(sigmas), use_area=False,
                       print_function=lambda *a, **k: None)
  ev.evaluate()
  ev.accumulate()
  ev.summarize()
  return [float(v) for v in ev.all_stats[:len(CROWDPOSE_AP_NAMES)]]


def coco_result(image_id: int, keypoints: np.ndarray, score: float,
                category_id: int = 1, missing: Optional[np.ndarray] = None) -> dict[str, Any]:
  """One COCO results entry.

  keypoints: float[K, 3] (x px, y px, keypoint score). missing: optional bool[K]
  keypoints without an answer: written as x = y = score = 0 and listed by index in the
  extra field ``missing`` (which :func:`coco_keypoint_ap` reads; other evaluators
  ignore it and would see a point at (0, 0)).
  """
  kp = np.asarray(keypoints, np.float64).reshape(-1, 3).copy()
  miss = np.zeros(len(kp), bool) if missing is None else np.asarray(missing, bool)
  kp[miss] = 0.0
  return {"image_id": int(image_id), "category_id": int(category_id),
          "keypoints": [round(float(v), 3) for v in kp.reshape(-1)],
          "score": float(score), "missing": [int(k) for k in np.flatnonzero(miss)]}


# ---------------------------------------------------------------------------
# PCK family.


def pck(pred: np.ndarray, gt: np.ndarray, visible: np.ndarray, norm: np.ndarray,
        thresholds: Sequence[float] = PCK_THRESHOLDS,
        missing: Optional[np.ndarray] = None) -> dict[str, Any]:
  """PCK@t: fraction of visible keypoints within ``t * norm`` pixels of the truth.

  Args:
    pred: float[N, K, 2] predicted pixels.
    gt: float[N, K, 2] ground-truth pixels.
    visible: bool[N, K] keypoints that count (labelled).
    norm: float[N] per-person normalizer in pixels (max(box w, h) for box PCK,
      ``SC_BIAS * head diagonal`` for PCKh).
    thresholds: the t values.
    missing: optional bool[N, K] keypoints without an answer: they count (when visible)
      and are never hits; their ``pred`` values are not read.
  Returns:
    {'PCK@t': mean over all counted keypoints, 'per_keypoint': {t: float[K] list
    (NaN where a keypoint never counts)}, 'count': keypoints counted, 'missing':
    counted keypoints without an answer}.
  Raises:
    DataError: a non-finite prediction not marked missing.
  """
  answered = answered_mask(pred, missing)
  pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
  visible = np.asarray(visible, bool)
  norm = np.asarray(norm, np.float64)
  pred = np.where(answered[..., None], pred, gt)      # never a hit below; keeps it finite
  err = np.linalg.norm(pred - gt, axis=-1) / np.maximum(norm, 1e-12)[:, None]
  out: dict[str, Any] = {"count": int(visible.sum()), "missing": int((visible & ~answered).sum()),
                         "per_keypoint": {}}
  counts = visible.sum(0)
  for t in thresholds:
    hit = (err <= t) & visible & answered
    key = f"PCK@{t:g}"
    out[key] = float(hit.sum() / max(visible.sum(), 1))
    with np.errstate(invalid="ignore", divide="ignore"):
      per = np.where(counts > 0, hit.sum(0) / np.maximum(counts, 1), np.nan)
    out["per_keypoint"][key] = [float(v) for v in per]
  return out


def box_pck(pred: np.ndarray, gt: np.ndarray, visible: np.ndarray, boxes: np.ndarray,
            thresholds: Sequence[float] = PCK_THRESHOLDS,
            missing: Optional[np.ndarray] = None) -> dict[str, Any]:
  """PCK normalized by the person box, max(w, h) (AP-10K style, CapeLLM).

  boxes: float[N, 4] x, y, w, h in pixels. Other arguments as :func:`pck`.
  """
  boxes = np.asarray(boxes, np.float64)
  return pck(pred, gt, visible, np.maximum(boxes[:, 2], boxes[:, 3]), thresholds, missing)


# MPII joint order (the common JSON conversion and mpii_gt_val.mat):
# 0 r ankle, 1 r knee, 2 r hip, 3 l hip, 4 l knee, 5 l ankle, 6 pelvis, 7 thorax,
# 8 upper neck, 9 head top, 10 r wrist, 11 r elbow, 12 r shoulder, 13 l shoulder,
# 14 l elbow, 15 l wrist.
MPII_GROUPS = {
    "Head": (9,), "Shoulder": (12, 13), "Elbow": (11, 14), "Wrist": (10, 15),
    "Hip": (2, 3), "Knee": (1, 4), "Ankle": (0, 5), "Pelvis": (6,), "Thorax": (7,),
    "Neck": (8,),
}
# Joints left out of the mean: 'standard' (HRNet / mmpose) drops pelvis and thorax;
# 'locllm' (LocLLM's valid2dmpii.py) also drops upper neck and head top, so the mean is
# over the 12 limb joints a COCO-trained model knows.
PCKH_MEAN_EXCLUDE = {"standard": (6, 7), "locllm": (6, 7, 8, 9)}


def category_pck(pred: np.ndarray, gt: np.ndarray, visible: np.ndarray, boxes: np.ndarray,
                 categories: Sequence[str], threshold: float = 0.2,
                 missing: Optional[np.ndarray] = None) -> dict[str, Any]:
  """MP-100's PCK@t as POMNet / CapeFormer / KptLLM compute it: per instance first.

  Each instance's PCK is mmpose's ``keypoint_pck_accuracy`` on it alone: the fraction
  of its counted keypoints with ``||pred - gt|| / max(box w, h) < t`` (strictly less),
  and 0 for an instance with no counted keypoint; 'PCK@t' is the mean over instances
  (the repos' ``_report_metric``). Also reported, named so: the mean over categories
  of their instance means, and the keypoints pooled over every instance.

  Args:
    pred, gt: float[N, K, 2] pixels (K = the largest category's keypoint count; rows
      past a category's own count are masked out by ``visible``).
    visible: bool[N, K] keypoints that count (labeled in the query, and in a support
      for visual prompts).
    boxes: float[N, 4] x, y, w, h pixels; the normalizer is max(w, h).
    categories: N category names.
    threshold: t (0.2 in the papers).
    missing: optional bool[N, K] keypoints without an answer (counted, never hits).

  Returns:
    {'PCK@t': mean over instances, 'PCK@t(category_mean)': mean over categories,
     'PCK@t(pooled)': hits / counted keypoints over all instances, 'per_category':
     {name: mean over its instances}, 'count': {name: instances}, 'keypoints': counted
     keypoints, 'missing': counted keypoints without an answer}.
  """
  answered = answered_mask(pred, missing)
  pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
  visible = np.asarray(visible, bool)
  boxes = np.asarray(boxes, np.float64)
  pred = np.where(answered[..., None], pred, gt)
  norm = np.maximum(boxes[:, 2], boxes[:, 3])
  err = np.linalg.norm(pred - gt, axis=-1) / np.maximum(norm, 1e-12)[:, None]
  hit = (err < threshold) & visible & answered & (norm > 0)[:, None]
  counted = visible & (norm > 0)[:, None]
  n_counted = counted.sum(1)
  per_instance = np.where(n_counted > 0, hit.sum(1) / np.maximum(n_counted, 1), 0.0)
  categories = np.asarray(list(categories), dtype=object)
  key = f"PCK@{threshold:g}"
  per, count = {}, {}
  for name in sorted(set(categories.tolist())):
    rows = categories == name
    per[str(name)], count[str(name)] = float(per_instance[rows].mean()), int(rows.sum())
  nan = float("nan")
  return {key: float(per_instance.mean()) if len(per_instance) else nan,
          f"{key}(category_mean)": float(np.mean(list(per.values()))) if per else nan,
          f"{key}(pooled)": float(hit.sum() / counted.sum()) if counted.any() else nan,
          "per_category": per, "count": count, "keypoints": int(counted.sum()),
          "missing": int((counted & ~answered).sum())}


def pckh(pred: np.ndarray, gt: np.ndarray, visible: np.ndarray, head_boxes: np.ndarray,
         variant: str = "standard", thresholds: Sequence[float] = (0.5, 0.1),
         missing: Optional[np.ndarray] = None) -> dict[str, Any]:
  """MPII PCKh: a joint is correct within ``t * SC_BIAS * ||head box diagonal||``.

  The mean weights each joint's PCKh by its visible count, as the MPII toolkit does,
  over the joints not excluded by ``variant`` ('standard' or 'locllm', see
  ``PCKH_MEAN_EXCLUDE``). PCKh@0.1 is computed at exactly 0.1; with ``variant='locllm'``
  the result also carries 'PCKh@0.1(locllm)', the number LocLLM's script prints as
  Mean@0.1, which (copied from HRNet) reads row 11 of the grid 0:0.01:0.5, i.e. t = 0.11.

  Args:
    pred, gt: float[N, 16, 2] pixels, MPII joint order.
    visible: bool[N, 16] joints present in the ground truth.
    head_boxes: float[N, 4] head boxes x1, y1, x2, y2 in pixels.
    missing: optional bool[N, 16] joints without an answer (counted, never correct).
  Returns:
    {'PCKh@t': mean in percent, 'PCKh@t/<group>': percent per MPII group,
     'missing': visible joints without an answer, 'per_keypoint': {'PCKh@t': float[16]
     percent}}.
  """
  if variant not in PCKH_MEAN_EXCLUDE:
    raise ValueError(f"PCKh variant must be one of {sorted(PCKH_MEAN_EXCLUDE)}, got {variant}")
  hb = np.asarray(head_boxes, np.float64)
  norm = PCKH_SC_BIAS * np.linalg.norm(hb[:, 2:4] - hb[:, 0:2], axis=-1)
  quirk = variant == "locllm" and 0.1 in thresholds
  res = pck(pred, gt, visible, norm, tuple(thresholds) + ((0.11,) if quirk else ()), missing)
  visible = np.asarray(visible, bool)
  counts = visible.sum(0).astype(np.float64)
  keep = np.ones(counts.shape[0], bool)
  keep[list(PCKH_MEAN_EXCLUDE[variant])] = False
  weights = np.where(keep, counts, 0.0)
  weights = weights / max(weights.sum(), 1e-12)
  out: dict[str, Any] = {"variant": variant, "missing": res["missing"], "per_keypoint": {}}
  for t in thresholds:
    key = f"PCKh@{t:g}"
    per = 100.0 * np.nan_to_num(np.asarray(res["per_keypoint"][f"PCK@{t:g}"]))
    out[key] = float(np.sum(per * weights))
    for group, idx in MPII_GROUPS.items():
      out[f"{key}/{group}"] = float(np.mean(per[list(idx)]))
    out["per_keypoint"][key] = [float(v) for v in per]
  if quirk:
    per = 100.0 * np.nan_to_num(np.asarray(res["per_keypoint"]["PCK@0.11"]))
    out["PCKh@0.1(locllm)"] = float(np.sum(per * weights))
  return out


# ---------------------------------------------------------------------------
# 3D: MPJPE and PA-MPJPE.


def procrustes_align(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
  """Similarity transform (scale, rotation, translation) of ``pred`` onto ``gt``.

  Args:
    pred, gt: float[K, 3].
  Returns:
    float[K, 3] aligned prediction (least-squares optimal, reflections excluded).
  """
  mu_p, mu_g = pred.mean(0), gt.mean(0)
  p, g = pred - mu_p, gt - mu_g
  u, s, vt = np.linalg.svd(p.T @ g)
  d = np.sign(np.linalg.det(u @ vt))
  fix = np.diag([1.0, 1.0, d])
  rot = u @ fix @ vt
  scale = np.sum(s * np.diag(fix)) / max(np.sum(p ** 2), 1e-12)
  return scale * p @ rot + mu_g


def mpjpe(pred: np.ndarray, gt: np.ndarray, actions: Optional[Sequence[str]] = None,
          root: int = 0, visible: Optional[np.ndarray] = None,
          missing: Optional[np.ndarray] = None) -> dict[str, Any]:
  """MPJPE and PA-MPJPE in millimetres, overall and per action (Human3.6M protocol).

  MPJPE: mean joint distance after subtracting each pose's root joint.
  PA-MPJPE: after a per-pose Procrustes alignment (scale, rotation, translation).
  The overall numbers are the mean over poses; per action the mean over its poses.

  Args:
    pred, gt: float[N, K, 3] millimetres.
    actions: N action names ('Directions', ...); None = a single group.
    root: root joint index (H36M: pelvis, 0).
    visible: optional bool[N, K]; joints outside are ignored.
    missing: optional bool[N, K] joints without an answer: left out of the means and
      counted ('missing_joints'); a pose whose root is missing cannot be root-aligned,
      so all its joints count as missing. Poses with no joint left are left out of the
      means and counted ('missing_poses'). Their values are not read.
  Raises:
    DataError: a non-finite prediction not marked missing.
  """
  answered = answered_mask(pred, missing)
  pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
  n, k = gt.shape[:2]
  vis = np.ones((n, k), bool) if visible is None else np.asarray(visible, bool)
  miss = ~answered
  miss |= miss[:, root:root + 1]
  pred = np.where(miss[..., None], gt, pred)          # never read below; keeps it finite
  use = vis & ~miss
  pred_r = pred - pred[:, root:root + 1]
  gt_r = gt - gt[:, root:root + 1]
  scored = use.any(1)
  per_pose = np.full(n, np.nan)
  per_pose_pa = np.full(n, np.nan)
  for i in np.flatnonzero(scored):
    m = use[i]
    per_pose[i] = np.linalg.norm(pred_r[i, m] - gt_r[i, m], axis=-1).mean()
    aligned = procrustes_align(pred[i, m], gt[i, m])
    per_pose_pa[i] = np.linalg.norm(aligned - gt[i, m], axis=-1).mean()

  def mean(v):
    return float(np.mean(v)) if len(v) else float("nan")

  out: dict[str, Any] = {"MPJPE": mean(per_pose[scored]), "PA-MPJPE": mean(per_pose_pa[scored]),
                         "missing_joints": int((miss & vis).sum()),
                         "missing_poses": int((~scored).sum()), "per_action": {}}
  if actions is not None:
    actions = np.asarray(list(actions))
    for a in sorted(set(actions.tolist())):
      sel = (actions == a) & scored
      out["per_action"][a] = {"MPJPE": mean(per_pose[sel]), "PA-MPJPE": mean(per_pose_pa[sel]),
                              "count": int(sel.sum())}
  used = use.sum(0)
  err = np.where(use, np.linalg.norm(pred_r - gt_r, axis=-1), 0.0).sum(0)
  out["per_keypoint_MPJPE"] = [float(e / c) if c else float("nan") for e, c in zip(err, used)]
  return out


def pixel_to_camera(xy: np.ndarray, z: np.ndarray, focal: np.ndarray, center: np.ndarray
                    ) -> np.ndarray:
  """Back-projects pixels with known depth through a pinhole camera.

  Args:
    xy: float[..., 2] pixels; z: float[...] depth in mm (camera z).
    focal: float[2] (fx, fy) pixels; center: float[2] (cx, cy) pixels.
  Returns:
    float[..., 3] camera coordinates in mm: ((x - cx) z / fx, (y - cy) z / fy, z).
  """
  xy, z = np.asarray(xy, np.float64), np.asarray(z, np.float64)
  f, c = np.asarray(focal, np.float64).ravel(), np.asarray(center, np.float64).ravel()
  return np.concatenate([(xy - c) / f * z[..., None], z[..., None]], axis=-1)


h36m_action = frame_action   # 'S1_Directions_1.54138969_000001.jpg' -> 'Directions'


# ---------------------------------------------------------------------------
# Tables.


def per_keypoint_table(names: Sequence[str], columns: Mapping[str, Sequence[float]]) -> list[dict]:
  """Rows {'keypoint': name, col: value, ...} from per-keypoint lists of equal length K."""
  rows = []
  for k, name in enumerate(names):
    row: dict[str, Any] = {"keypoint": name}
    for col, values in columns.items():
      v = float(values[k])
      row[col] = None if np.isnan(v) else v
    rows.append(row)
  return rows


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Optional[Sequence[str]] = None,
                   digits: int = 3) -> str:
  """A Markdown table of ``rows`` (dicts); floats rounded to ``digits``."""
  if not rows:
    return ""
  columns = list(columns or rows[0].keys())

  def fmt(v):
    if isinstance(v, float):
      return f"{v:.{digits}f}"
    return "" if v is None else str(v)

  lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
  lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
  return "\n".join(lines) + "\n"
