"""How each benchmark is scored: one ``Protocol`` record per dataset kind, in a
registry (big_vision's ``evals`` style: data, not ``if dataset == ...``), and the
person-level metrics it selects.

    >>> protocol = protocol_for(records)             # records[0].dataset, or a config field
    >>> protocol.oks_ap, protocol.pckh, protocol.mpjpe, protocol.default_task
    >>> result = compute_metrics(records, entries, spec.names, coco_gt=..., sigmas=...)

The dataset kind is what the reader stamped on the records (``PersonRecord.dataset``:
'coco', 'mpii', 'h36m', 'mp100', ...); ``config.data.eval.protocol`` (when the config
has it) names another entry. A kind not in the registry is scored as COCO-format
keypoints (OKS AP from its COCO file, box PCK).

Metric families:
  oks_ap   OKS AP / AR by the benchmark's own evaluator setting: 'coco' (pycocotools),
           'crowdpose' (AP(E/M/H)), 'aic' (mmpose's AIC setting); None: no OKS AP.
  pck      box PCK (normalized by the box size): always, with ground truth.
  pckh     MPII's PCKh with head boxes (its joint groups); without head boxes the run
           is refused unless box PCK only is asked (``mpii_box_pck``).
  mpjpe    3D: MPJPE / PA-MPJPE per action, from the root-relative depth answers.
  default_task 'visual' | 'textual' | 'semantic': category-agnostic questions (MP-100
           1/5-shot, ``kptjax.evaluation.prompted``): PCK@0.2 per instance and category.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from kptjax import errors
from kptjax.data import cape
from kptjax.data.sources import specs_of
from kptjax.data.sources.fields import category_table, load_json
from kptjax.evaluation import metrics, oks

PERSON_TASK = "keypoints"                        # every keypoint of the spec, per person
PROMPTED_TASKS = ("visual", "visual+textual", "textual", "semantic")


@dataclasses.dataclass(frozen=True)
class Protocol:
  """How one dataset kind is scored (module docstring).

  Attributes:
    name: the registry key.
    oks_ap: 'coco' | 'crowdpose' | 'aic' (``oks.AP_PROTOCOLS``), or None.
    pckh: PCKh from head boxes (MPII joint order).
    needs_head_boxes: refuse before decoding when a record lacks its head box (unless
      box PCK only is asked).
    mpjpe: 3D metrics from depth answers and cameras.
    default_task: the task when none is asked: 'keypoints', or one of PROMPTED_TASKS
      (category-agnostic questions, ``kptjax.evaluation.prompted``).
  """
  name: str
  oks_ap: Optional[str] = "coco"
  pckh: bool = False
  needs_head_boxes: bool = False
  mpjpe: bool = False
  default_task: str = PERSON_TASK


PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (
    Protocol("coco"),
    Protocol("crowdpose", oks_ap="crowdpose"),
    Protocol("aic", oks_ap="aic"),
    Protocol("mpii", oks_ap=None, pckh=True, needs_head_boxes=True),
    Protocol("h36m", oks_ap=None, mpjpe=True),
    Protocol("mp100", oks_ap=None, default_task="visual"),
)}
DEFAULT = PROTOCOLS["coco"]


def protocol_for(records: Sequence[Any], config: Any = None) -> Protocol:
  """The protocol of ``config.data.eval.protocol`` when set, else of the records' kind."""
  name = config.data.eval.get("protocol", "") if config is not None else ""
  if name and name not in PROTOCOLS:
    raise errors.ConfigError(f"data.eval.protocol={name!r}; known: {sorted(PROTOCOLS)}")
  if not name:
    name = records[0].dataset if len(records) else ""
  return PROTOCOLS.get(name, DEFAULT)


def keypoint_spec(records: Sequence[Any], limit: Optional[int] = None,
                  what: str = "evaluate") -> Any:
  """The one KeypointSpec of the first ``limit`` records (default all): the records'
  own (``Records.specs``), or the registry's by name (``sources.specs_of``).

  Raises:
    ConfigError: those records hold several specs.
  """
  names = sorted({records[i].spec for i in range(len(records))[:limit]})
  if len(names) != 1:
    raise errors.ConfigError(f"{what} asks one keypoint spec per run; the dataset has {names}")
  return specs_of(records)[names[0]]


def oks_ground_truth(records: Any, protocol: Protocol) -> Optional[str]:
  """The COCO-format file OKS AP is computed against (the records' source), or None."""
  source = str(getattr(records, "source", ""))
  return source if protocol.oks_ap and source.endswith(".json") else None


def check_protocol(records: Sequence[Any], mpii_box_pck: bool = False,
                   protocol: Optional[Protocol] = None) -> None:
  """Refuses a dataset whose benchmark metric cannot be computed, before any decoding.

  MPII's metric is PCKh, which needs every record's head box (``headbox_file``);
  without them only box PCK can be reported, and only when asked (``mpii_box_pck``).
  """
  protocol = protocol or (protocol_for(records) if len(records) else DEFAULT)
  if protocol.needs_head_boxes and not mpii_box_pck and \
      any(r.head_box is None for r in records):
    raise errors.ConfigError(
        f"{getattr(records, 'source', protocol.name)}: {protocol.name} is scored by PCKh, "
        "which needs the head boxes: add headbox_file=<mpii_gt_val.mat> to the dataset, or "
        "ask for box PCK only (--mpii_box_pck, config.decode.mpii_box_pck)")


def protocol_record(protocol: Protocol, records: Sequence[Any], config: Any, *, task: str,
                    pckh_variant: str = "", mpii_box_pck: bool = False) -> dict[str, Any]:
  """What produced an evaluation's numbers, for ``metrics.json['protocol']``.

  The registry entry and task; the crop padding; the keypoints training held out
  (``data.heldout_keypoints``, LocLLM's novel-keypoint protocol); with PCKh, the variant,
  whether every person had its head box and whether box PCK was asked; for the prompted
  (MP-100-style) tasks, which split produced the test file (``cape.split_protocol``:
  seeded, cross-supercategory, or files of unknown origin such as POMNet's).
  """
  out: dict[str, Any] = {
      "name": protocol.name, "task": task, "padding": float(config.data.padding),
      "heldout_keypoints": config.data.get("heldout_keypoints", "") or None}
  if protocol.pckh:
    out.update(pckh_variant=pckh_variant or None, mpii_box_pck=bool(mpii_box_pck),
               head_boxes=bool(len(records)) and all(r.head_box is not None for r in records))
  if task in PROMPTED_TASKS:
    source = os.fspath(getattr(records, "source", "") or "")
    out["split"] = cape.split_protocol(source) if source and os.path.isfile(source) else None
  return out


# ---------------------------------------------------------------------------
# Missing answers.


def missing_counts(missing: np.ndarray, asked: np.ndarray, unreadable: np.ndarray,
                   unreadable_files: Sequence[str] = ()) -> dict[str, Any]:
  """The counts of missing answers every metrics.json carries.

  Args:
    missing: bool[N, K] keypoints scored as missing.
    asked: bool[N, K] keypoints asked (all of them for the 'keypoints' task).
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


# ---------------------------------------------------------------------------
# Results in the benchmarks' own terms.


def camera_3d(rec: Any, xy: np.ndarray, depth_rel: np.ndarray, root: int = 0) -> np.ndarray:
  """LocLLM's 3D: root-relative depth + the ground-truth root depth, back-projected.
  xy f32[K, 2] pixels, depth_rel f32[K] mm -> f32[K, 3] camera coordinates, mm."""
  z = depth_rel - depth_rel[root] + float(rec.keypoints_3d[root, 2])
  return metrics.pixel_to_camera(xy, z, rec.camera["f"], rec.camera["c"])


def category_ids(coco_gt: Optional[str], records: Sequence[Any]) -> dict[int, int]:
  """{record ann_id: category id} for the results: each record's category (the
  annotation's, or the detection's) by name in the COCO file's ``categories`` (read by
  the data side's ``category_table``); a record without one takes the file's only
  category.

  Raises:
    DataError: a record's category is not in the file, or it has none and the file has
      several.
  """
  if not coco_gt:
    return {}
  by_name = {str(c.get("name")): int(i)
             for i, c in category_table(load_json(coco_gt), coco_gt).items()}
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


def coco_entry(e: dict, categories: Mapping[int, int]) -> dict:
  """The COCO results entry of a person entry (missing keypoints as 0 and listed)."""
  kp = np.array(e["keypoints"])
  return oks.coco_result(e["image_id"], kp, e["score"], categories.get(int(e["ann_id"]), 1),
                         missing=missing_mask([e], len(kp))[0])


def compute_metrics(records: Sequence[Any], entries: Sequence[dict], names: Sequence[str], *,
                    coco_gt: Optional[str] = None, sigmas: Optional[Sequence[float]] = None,
                    pckh_variant: str = "standard", has_gt: bool = True,
                    root: int = 0, mpii_box_pck: bool = False,
                    protocol: Optional[Protocol] = None) -> dict[str, Any]:
  """Every metric the records' protocol selects, from per-person entries.

  Args:
    records: the PersonRecords (``entries[i]['index']`` points into them).
    entries: per-person predictions (``kptjax.evaluation.persons.person_entry``):
      'keypoints' [K, 3] x px, y px, score; 'missing' keypoint indices; 'score'.
    names: the K keypoint names asked.
    coco_gt: COCO-format ground-truth file for OKS AP (``oks_ground_truth``).
    sigmas: OKS sigmas (the keypoint spec's); AP is skipped without them.
    pckh_variant: 'standard' or 'locllm' (``metrics.pckh``).
    has_gt: whether records carry ground-truth keypoints (False for detection boxes).
    root: root joint of 3D poses (the spec's ``root_index``).
    mpii_box_pck: PCKh protocols without head boxes report box PCK only (else
      ConfigError).
    protocol: default ``protocol_for(records)``.

  OKS AP is the protocol's evaluator setting over every image of ``coco_gt`` holding
  the records' categories (images where the detector found nobody included), or, when
  only the first persons were decoded (``max_persons``), over their images. Categories
  are the records' own (annotation's or detection's). PCKh needs head boxes on every
  record and the K = 16 keypoints in MPII order (its groups and the joints left out of
  the mean are MPII's).

  Missing keypoints are passed to every metric as ``missing`` (misses in PCK / PCKh and
  OKS, counted in MPJPE). Counts: ``num_answers`` answers decoded, ``parse_failures``
  of them unparseable (``parse_failure_rate``), ``image_errors`` persons not decoded
  because their image could not be read (``unreadable_images`` lists those files),
  ``missing_keypoints`` every keypoint scored as missing.
  """
  protocol = protocol or (protocol_for(records) if len(records) else DEFAULT)
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
  if coco_gt and protocol.oks_ap and sigmas is not None and len(sigmas) == len(names):
    cats = category_ids(coco_gt, records)
    preds = [coco_entry(e, cats) for e in entries]
    partial = len({e["index"] for e in entries}) < len(records)
    image_ids = sorted({int(records[e["index"]].image_id) for e in entries}) if partial else None
    out["ap_protocol"] = protocol.oks_ap
    out["coco"] = oks.coco_keypoint_ap(coco_gt, preds, sigmas, image_ids=image_ids,
                                       category_ids=sorted(set(cats.values())),
                                       protocol=protocol.oks_ap)
  recs = [records[e["index"]] for e in entries]
  check_protocol(recs, mpii_box_pck, protocol)
  if has_gt and recs and recs[0].keypoints.shape[0] == len(names):
    pred = np.array([np.array(e["keypoints"])[:, :2] for e in entries])
    gt = np.stack([r.keypoints[:, :2] for r in recs])
    vis = np.stack([r.keypoints[:, -1] > 0 for r in recs])
    pck = metrics.box_pck(pred, gt, vis, np.stack([r.box for r in recs]), missing=missing)
    out["pck"] = {k: v for k, v in pck.items() if k != "per_keypoint"}
    columns.update(pck["per_keypoint"])
    if protocol.pckh and all(r.head_box is not None for r in recs):
      pckh = metrics.pckh(pred, gt, vis, np.stack([r.head_box for r in recs]), pckh_variant,
                          missing=missing)
      out["pckh"] = {k: v for k, v in pckh.items() if k != "per_keypoint"}
      columns.update(pckh["per_keypoint"])
    if protocol.mpjpe and "depth_rel" in entries[0] and \
        all(r.keypoints_3d is not None and r.camera is not None for r in recs):
      cam = np.stack([camera_3d(r, np.array(e["keypoints"])[:, :2], np.array(e["depth_rel"]),
                                root) for r, e in zip(recs, entries)])
      gt3 = np.stack([r.keypoints_3d[:, :3] for r in recs])
      actions = [r.extra.get("action") or metrics.h36m_action(r.image_path) for r in recs]
      mp = metrics.mpjpe(cam, gt3, actions, root=root, missing=missing)
      columns["MPJPE"] = mp.pop("per_keypoint_MPJPE")
      out["mpjpe"] = mp
  out["per_keypoint"] = metrics.per_keypoint_table(names, columns)
  return out
