"""OKS AP/AR as each benchmark's own evaluator computes it: COCO, Human-Art, OCHuman,
AP-10K (pycocotools); CrowdPose (faster-coco-eval's port of xtcocotools'
'keypoints_crowd'); AI Challenger (mmpose's xtcocotools setting). Which one a dataset
gets is its ``kptjax.evaluation.protocols.Protocol.oks_ap``.

    >>> coco_keypoint_ap("person_keypoints_val2017.json", results, sigmas)["AP"]

Missing keypoints (``missing`` in a result) never match: before the evaluator sees them
they are moved ``MISSING_FAR_PX`` away, where their OKS term is exactly 0.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from typing import Any, Mapping, Optional, Sequence

import faster_coco_eval
import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from kptjax import errors
from kptjax.evaluation.metrics import answered_mask

COCO_AP_NAMES = ("AP", "AP50", "AP75", "APM", "APL", "AR", "AR50", "AR75", "ARM", "ARL")
CROWDPOSE_AP_NAMES = ("AP", "AP50", "AP75", "AR", "AR50", "AR75", "AP(E)", "AP(M)", "AP(H)")
# The OKS AP protocol of each COCO-format benchmark (README "Evaluation" has the table).
AP_PROTOCOLS = {"coco": COCO_AP_NAMES, "aic": COCO_AP_NAMES, "crowdpose": CROWDPOSE_AP_NAMES}
# xtcocotools with use_area=False (mmpose's CrowdPose and AIC setting) uses 0.53 x box
# area as the object scale, for OKS and for the area ranges alike.
AREA_FROM_BOX = 0.53
# Where a missing keypoint goes before the evaluator sees it: exp(-d^2 / (2 s^2 k^2))
# underflows to exactly 0 for every object smaller than ~1e13 px^2.
MISSING_FAR_PX = 1e9


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
  coco_gt = faster_coco_eval.COCO(data, print_function=lambda *a, **k: None)
  ev = faster_coco_eval.COCOeval_faster(coco_gt, coco_gt.loadRes(results), "keypoints_crowd",
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
