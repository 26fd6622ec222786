"""Keypoint metrics: PCKh (MPII), PCK (box-normalized; per instance for MP-100),
MPJPE / PA-MPJPE (Human3.6M), per-keypoint tables, and the missing-answer boundary
(``answered_mask``). OKS AP/AR is ``kptjax.evaluation.oks``.

Units: 2D coordinates in original-image pixels; 3D coordinates in millimetres.
Every function takes numpy arrays and returns plain Python floats / dicts so the
results go straight into ``metrics.json``.

Missing answers (the boundary every caller keeps): a prediction is ``pred float[N, K, D]``
plus ``missing bool[N, K]``; the values of missing entries are never read. A missing
keypoint is never a PCK / PCKh hit (it still counts in the denominator), never part of
an MPJPE mean (it is counted instead) and never matches in OKS (its OKS term is exactly
0, see ``oks.coco_keypoint_ap``). A non-finite value that is not marked missing is
refused (``DataError`` naming the field).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np

from kptjax import errors
from kptjax.data.sources.h36m import frame_action

PCK_THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.25)
PCKH_SC_BIAS = 0.6


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
