"""Every benchmark's OKS AP equals its reference evaluator run directly on the same files.

References, run here on files the tests write beside the real samples' annotations:
  COCO, Human-Art, OCHuman, AP-10K  pycocotools COCOeval('keypoints')
  CrowdPose                         xtcocotools COCOeval('keypoints_crowd', use_area=False)
                                    (mmpose's CocoMetric setting for CrowdPose)
  AI Challenger                     xtcocotools COCOeval('keypoints', use_area=False)
                                    (mmpose's CocoMetric setting for AIC)
with ground-truth boxes and with detection files (including images where the detector
found nobody), with noisy predictions and with missing keypoints. kptjax's numbers come
from ``protocols.compute_metrics`` on records read by kptjax's own readers; which
evaluator setting a benchmark gets is its entry in the ``protocols`` registry.
"""

import contextlib
import io
import json
import types

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from xtcocotools.coco import COCO as XtCOCO
from xtcocotools.cocoeval import COCOeval as XtCOCOeval

from kptjax import errors, evaluate
from kptjax.data.sources import read_dataset
from kptjax.evaluation import oks, protocols
from kptjax.keypoints import get_spec

# name: (folder, annotation file, detection file in the sample or None, spec, reference)
BENCHMARKS = {
    "coco": ("coco", "test_coco.json", "test_coco_det_AP_H_56.json", "coco17", "pycocotools"),
    "humanart": ("humanart", "test_humanart.json", "test_humanart_det_AP_H_56.json", "coco17",
                 "pycocotools"),
    "ochuman": ("ochuman", "test_ochuman.json", None, "coco17", "pycocotools"),
    "ap10k": ("ap10k", "test_ap10k.json", None, "ap10k17", "pycocotools"),
    "crowdpose": ("crowdpose", "test_crowdpose.json", "test_crowdpose_det_AP_40.json",
                  "crowdpose14", "keypoints_crowd"),
    "aic": ("aic", "test_aic.json", None, "aic14", "keypoints"),
}


def reference_ap(gt_path, results, tmp_path, sigmas, tool):
  """The benchmark's evaluator, run the official way: files on disk, COCO(path),
  loadRes(path), COCOeval, summarize. Returns its stats list."""
  res_path = tmp_path / "reference_results.json"
  res_path.write_text(json.dumps(results))
  with contextlib.redirect_stdout(io.StringIO()):
    if tool == "pycocotools":
      gt = COCO(str(gt_path))
      ev = COCOeval(gt, gt.loadRes(str(res_path)), "keypoints")
      ev.params.kpt_oks_sigmas = np.array(sigmas)
    else:                        # mmpose's CocoMetric: COCOeval(gt, dt, iou_type, sigmas, use_area)
      gt = XtCOCO(str(gt_path))
      ev = XtCOCOeval(gt, gt.loadRes(str(res_path)), tool, np.array(sigmas), use_area=False)
      ev.params.useSegm = None
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return [float(v) for v in ev.stats]


def _iou(a, b):
  x0, y0 = max(a[0], b[0]), max(a[1], b[1])
  x1, y1 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
  inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
  return inter / (a[2] * a[3] + b[2] * b[3] - inter + 1e-9)


def write_detections(gt_json, rng, path):
  """A detection file: each labelled person's box, jittered, plus a false positive per
  image; the first image gets no detection at all (its people must stay in recall)."""
  dets = []
  skip = gt_json["images"][0]["id"]
  for ann in gt_json["annotations"]:
    if ann["image_id"] == skip:
      continue
    x, y, w, h = ann["bbox"]
    dets.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                 "bbox": [x + rng.normal(0, 2), y + rng.normal(0, 2), w * 1.05, h * 1.05],
                 "score": float(rng.uniform(0.3, 1.0))})
  for img in gt_json["images"][1:]:
    dets.append({"image_id": img["id"], "category_id": gt_json["annotations"][0]["category_id"],
                 "bbox": [5.0, 5.0, 60.0, 80.0], "score": 0.35})
  path.write_text(json.dumps(dets))
  return str(path)


def predict(records, gt_json, rng, jitter_px, missing_every=0):
  """Entries as kptjax.evaluation.persons makes them: each record gets the keypoints of the
  ground-truth person its box overlaps most (none: the box centre), plus noise."""
  anns = {}
  for ann in gt_json["annotations"]:
    anns.setdefault(ann["image_id"], []).append(ann)
  entries = []
  for i, r in enumerate(records):
    k = r.num_keypoints
    best = max(anns.get(r.image_id, []), key=lambda a: _iou(a["bbox"], r.box), default=None)
    if best is not None and _iou(best["bbox"], r.box) > 0.3:
      xy = np.array(best["keypoints"], np.float64).reshape(-1, 3)[:, :2]
    else:
      xy = np.tile(r.box[:2] + r.box[2:] / 2, (k, 1))
    xy = xy + rng.normal(0, jitter_px, xy.shape) * (1 + i % 3)
    scores = rng.uniform(0.2, 1.0, k)
    missing = []
    if missing_every:
      missing = [j for j in range(k) if (i * k + j) % missing_every == 0]
      xy[missing] = np.nan              # values of missing keypoints are never read
      scores[missing] = 0.0
    entries.append({"index": i, "image_id": int(r.image_id), "ann_id": int(r.ann_id),
                    "keypoints": np.c_[xy, scores].tolist(), "ok": [True] * k,
                    "missing": missing, "score": float(scores.mean()) * float(r.score)})
  return entries


def results_file(records, entries, gt_path):
  """The COCO results of the entries (predictions.json's content): missing keypoints as
  0 and listed in ``missing``, each in its record's category."""
  cats = protocols.category_ids(str(gt_path), records)
  return [oks.coco_result(e["image_id"], np.array(e["keypoints"]), e["score"],
                          cats[e["ann_id"]],
                          missing=np.isin(np.arange(len(e["keypoints"])), e["missing"]))
          for e in entries]


def tool_file(results):
  """What the evaluator is given for results with missing keypoints (the documented
  method, ``oks.coco_keypoint_ap``): missing keypoints at MISSING_FAR_PX with score
  0, and each entry's ``bbox`` that of its answered keypoints."""
  out = []
  for r in results:
    kp = np.array(r["keypoints"], np.float64).reshape(-1, 3)
    miss = np.isin(np.arange(len(kp)), r["missing"])
    xy = kp[~miss, :2]
    kp[miss] = (oks.MISSING_FAR_PX, oks.MISSING_FAR_PX, 0.0)
    lo, hi = (xy.min(0), xy.max(0)) if len(xy) else (np.zeros(2), np.zeros(2))
    out.append({"image_id": r["image_id"], "category_id": r["category_id"],
                "keypoints": kp.reshape(-1).tolist(), "score": r["score"],
                "bbox": [float(lo[0]), float(lo[1]), float(hi[0] - lo[0]), float(hi[1] - lo[1])]})
  return out


def _setup(shared_data, tmp_path, name, boxes):
  folder, ann, det, spec_name, tool = BENCHMARKS[name]
  gt_path = shared_data / folder / ann
  gt_json = json.loads(gt_path.read_text())
  kwargs = dict(ann_file=str(gt_path), image_root=str(shared_data / folder))
  if boxes == "detections":
    kwargs["det_file"] = str(shared_data / folder / det) if det else \
        write_detections(gt_json, np.random.default_rng(5), tmp_path / "dets.json")
  return gt_path, gt_json, read_dataset(name, **kwargs), get_spec(spec_name), tool


@pytest.mark.parametrize("boxes", ["ground_truth", "detections"])
@pytest.mark.parametrize("case", ["noisy", "missing"])
@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_ap_equals_reference_evaluator(shared_data, tmp_path, name, boxes, case):
  gt_path, gt_json, records, spec, tool = _setup(shared_data, tmp_path, name, boxes)
  entries = predict(records, gt_json, np.random.default_rng(0), 4.0,
                    missing_every=5 if case == "missing" else 0)
  ours = protocols.compute_metrics(records, entries, spec.names, coco_gt=str(gt_path),
                                  sigmas=spec.sigmas, has_gt=boxes == "ground_truth")
  results = results_file(records, entries, gt_path)
  given = tool_file(results) if case == "missing" else results
  ref = reference_ap(gt_path, given, tmp_path, spec.sigmas, tool)
  names = oks.AP_PROTOCOLS[protocols.protocol_for(records).oks_ap]
  assert [ours["coco"][k] for k in names] == pytest.approx(ref, abs=1e-6, rel=0)
  assert 0 < ours["coco"]["AP"] < 1                  # noisy: neither trivial nor perfect


def test_images_without_detections_stay_in_recall(shared_data, tmp_path):
  """The COCO sample's own detection file covers every image; with one image's
  detections removed, its people are misses (all images evaluated), not dropped."""
  gt_path, gt_json, _, spec, _ = _setup(shared_data, tmp_path, "coco", "ground_truth")
  dets = json.loads((shared_data / "coco" / "test_coco_det_AP_H_56.json").read_text())
  dets = [d for d in dets if d["image_id"] != 196141]           # 5 people there
  (tmp_path / "dets.json").write_text(json.dumps(dets))
  records = read_dataset("coco", ann_file=str(gt_path), image_root=str(shared_data / "coco"),
                         det_file=str(tmp_path / "dets.json"))
  assert 196141 not in {r.image_id for r in records}
  entries = predict(records, gt_json, np.random.default_rng(1), 0.0)
  ours = protocols.compute_metrics(records, entries, spec.names, coco_gt=str(gt_path),
                                  sigmas=spec.sigmas, has_gt=False)["coco"]
  results = results_file(records, entries, gt_path)
  ref = reference_ap(gt_path, results, tmp_path, spec.sigmas, "pycocotools")
  assert [ours[k] for k in oks.COCO_AP_NAMES] == pytest.approx(ref, abs=1e-6, rel=0)
  only_detected = oks.coco_keypoint_ap(
      str(gt_path), results, spec.sigmas, image_ids=sorted({r.image_id for r in records}))
  assert ours["AR"] < only_detected["AR"]              # the old answer hid those misses


def test_ap10k_detections_keep_their_category(shared_data, tmp_path):
  """A detection's category_id (AP-10K: the species) reaches the results and the AP."""
  gt_path, gt_json, records, spec, _ = _setup(shared_data, tmp_path, "ap10k", "detections")
  cats = protocols.category_ids(str(gt_path), records)
  dets = json.loads((tmp_path / "dets.json").read_text())
  assert sorted({cats[r.ann_id] for r in records}) == sorted({d["category_id"] for d in dets})
  assert set(cats.values()) - {1}                       # not everything forced to 1
  entries = predict(records, gt_json, np.random.default_rng(2), 0.0)
  out = protocols.compute_metrics(records, entries, spec.names, coco_gt=str(gt_path),
                                 sigmas=spec.sigmas, has_gt=False)
  results = results_file(records, entries, gt_path)
  assert {r["category_id"] for r in results} == {d["category_id"] for d in dets}
  ref = reference_ap(gt_path, results, tmp_path, spec.sigmas, "pycocotools")
  assert [out["coco"][k] for k in oks.COCO_AP_NAMES] == pytest.approx(ref, abs=1e-6)


def test_crowdpose_without_area_uses_053_box_and_crowd_index(shared_data, tmp_path):
  gt_path, gt_json, records, spec, _ = _setup(shared_data, tmp_path, "crowdpose",
                                              "ground_truth")
  assert not any("area" in a for a in gt_json["annotations"])
  entries = predict(records, gt_json, np.random.default_rng(3), 6.0)
  results = results_file(records, entries, gt_path)
  ours = oks.coco_keypoint_ap(str(gt_path), results, spec.sigmas, protocol="crowdpose")
  assert list(ours) == ["AP", "AP50", "AP75", "AR", "AR50", "AR75", "AP(E)", "AP(M)", "AP(H)"]
  ref = reference_ap(gt_path, results, tmp_path, spec.sigmas, "keypoints_crowd")
  assert list(ours.values()) == pytest.approx(ref, abs=1e-6)
  # Both sample images have crowdIndex in [0.2, 0.8): AP(M) is AP (rounded), E and H empty.
  assert ours["AP(M)"] == round(ours["AP"], 4) and ours["AP(E)"] == ours["AP(H)"] == -1
  # The full box area as the object scale (kptjax's old answer) is another number.
  for ann in gt_json["annotations"]:
    ann["area"] = ann["bbox"][2] * ann["bbox"][3]
  full_box = oks.coco_keypoint_ap(gt_json, results, spec.sigmas)
  assert full_box["AP"] != pytest.approx(ours["AP"], abs=1e-3)


def test_crowdpose_image_without_crowd_index_is_refused(shared_data):
  gt = json.loads((shared_data / "crowdpose" / "test_crowdpose.json").read_text())
  del gt["images"][1]["crowdIndex"]
  ann = gt["annotations"][0]
  result = {"image_id": ann["image_id"], "category_id": 1, "keypoints": ann["keypoints"],
            "score": 1.0}
  with pytest.raises(errors.DataError, match="crowdIndex"):
    oks.coco_keypoint_ap(gt, [result], get_spec("crowdpose14").sigmas, protocol="crowdpose")


def test_aic_without_iscrowd_is_evaluated(shared_data, tmp_path):
  gt_path, gt_json, records, spec, _ = _setup(shared_data, tmp_path, "aic", "ground_truth")
  assert not any("iscrowd" in a for a in gt_json["annotations"])
  entries = predict(records, gt_json, np.random.default_rng(4), 0.0)
  out = protocols.compute_metrics(records, entries, spec.names, coco_gt=str(gt_path),
                                 sigmas=spec.sigmas)
  assert out["ap_protocol"] == "aic" and out["coco"]["AP"] == pytest.approx(1.0)


def test_all_zero_score_results_are_ignored_like_xtcocotools(shared_data, tmp_path):
  """xtcocotools (CrowdPose, AIC) skips a result whose keypoint scores are all 0."""
  for name in ("crowdpose", "aic"):
    gt_path, gt_json, records, spec, tool = _setup(shared_data, tmp_path, name, "ground_truth")
    entries = predict(records, gt_json, np.random.default_rng(6), 2.0)
    for e in entries[:2]:                             # high-scored decoys, keypoint scores 0
      decoy = dict(e, keypoints=[[x + 40, y, 0.0] for x, y, _ in e["keypoints"]], score=0.99)
      entries.append(decoy)
    results = results_file(records, entries, gt_path)
    ours = oks.coco_keypoint_ap(str(gt_path), results, spec.sigmas, protocol=name)
    ref = reference_ap(gt_path, results, tmp_path, spec.sigmas, tool)
    assert list(ours.values()) == pytest.approx(ref, abs=1e-6)


def test_missing_keypoint_oks_term_is_zero(shared_data):
  """One person, answered exactly except 4 missing keypoints: its OKS is exactly the
  fraction of labelled keypoints answered (a missing keypoint contributes 0)."""
  gt = json.loads((shared_data / "coco" / "test_coco.json").read_text())
  ann = max(gt["annotations"], key=lambda a: a["num_keypoints"])
  gt["annotations"] = [ann]
  gt["images"] = [i for i in gt["images"] if i["id"] == ann["image_id"]]
  kp = np.array(ann["keypoints"], np.float64).reshape(-1, 3)
  labelled = np.flatnonzero(kp[:, 2] > 0)
  miss = np.zeros(17, bool)
  miss[labelled[:4]] = True
  result = oks.coco_result(ann["image_id"], np.c_[kp[:, :2], np.ones(17)], 1.0,
                           missing=miss)
  with contextlib.redirect_stdout(io.StringIO()):
    coco = oks.load_coco_gt(gt)
    ev = COCOeval(coco, coco.loadRes(tool_file([result])), "keypoints")
    ev.evaluate()
  oks_value = ev.ious[(ann["image_id"], 1)][0, 0]
  assert oks_value == (len(labelled) - 4) / len(labelled)
  # The missing keypoints' written values (0, 0) never count: moving them changes nothing.
  far = dict(result, keypoints=[v + 1000.0 * (i // 3 in labelled[:4]) * (i % 3 < 2)
                                for i, v in enumerate(result["keypoints"])])
  assert oks.coco_keypoint_ap(gt, [far]) == oks.coco_keypoint_ap(gt, [result])


def test_nan_predictions_are_not_perfect(shared_data):
  """All-NaN keypoints for every person of the COCO sample: today AP = 1.0. Unmarked they
  are refused; marked missing they miss everything."""
  path = shared_data / "coco" / "test_coco.json"
  gt = json.loads(path.read_text())
  nan = [{"image_id": a["image_id"], "category_id": 1, "score": 1.0,
          "keypoints": [float("nan"), float("nan"), 1.0] * 17} for a in gt["annotations"]]
  with pytest.raises(errors.DataError, match=r"results\[0\]\.keypoints"):
    oks.coco_keypoint_ap(str(path), nan)
  missing = [dict(r, missing=list(range(17))) for r in nan]
  out = oks.coco_keypoint_ap(str(path), missing)
  assert out["AP"] == 0.0 and out["AR"] == 0.0
  # Through compute_metrics, from entries with every keypoint missing.
  records = read_dataset("coco", ann_file=str(path), image_root=str(shared_data / "coco"))
  entries = predict(records, gt, np.random.default_rng(0), 0.0, missing_every=1)
  spec = get_spec("coco17")
  got = protocols.compute_metrics(records, entries, spec.names, coco_gt=str(path),
                                 sigmas=spec.sigmas)
  assert got["coco"]["AP"] == 0.0 and got["pck"]["PCK@0.25"] == 0.0


def test_mpii_without_head_boxes_is_an_error(shared_data):
  d = shared_data / "mpii"
  records = read_dataset("mpii", ann_file=str(d / "test_mpii.json"), image_root=str(d))
  assert all(r.head_box is None for r in records)
  spec = get_spec("mpii16")
  rng = np.random.default_rng(0)
  entries = [{"index": i, "image_id": int(r.image_id), "ann_id": int(r.ann_id), "ok": [True] * 16,
              "missing": [], "score": 1.0,
              "keypoints": np.c_[r.keypoints[:, :2] + rng.normal(0, 3, (16, 2)),
                                 np.ones(16)].tolist()} for i, r in enumerate(records)]
  with pytest.raises(errors.ConfigError, match="headbox_file"):
    protocols.compute_metrics(records, entries, spec.names)
  with pytest.raises(errors.ConfigError, match="mpii_box_pck"):
    protocols.check_protocol(records)
  out = protocols.compute_metrics(records, entries, spec.names, mpii_box_pck=True)
  assert "pckh" not in out and 0 < out["pck"]["PCK@0.05"] <= 1


def test_results_outside_the_ground_truth_are_refused(shared_data):
  path = shared_data / "coco" / "test_coco.json"
  ann = json.loads(path.read_text())["annotations"][0]
  good = {"image_id": ann["image_id"], "category_id": 1, "keypoints": ann["keypoints"],
          "score": 1.0}
  with pytest.raises(errors.DataError, match=r"results\[1\]\.image_id"):
    oks.coco_keypoint_ap(str(path), [good, dict(good, image_id=12345)])
  with pytest.raises(errors.DataError, match=r"results\[0\]\.category_id"):
    oks.coco_keypoint_ap(str(path), [dict(good, category_id=7)])
  with pytest.raises(errors.DataError, match=r"results\[0\]\.score"):
    oks.coco_keypoint_ap(str(path), [dict(good, score=float("nan"))])


def test_evaluate_run_refuses_mpii_without_head_boxes_before_decoding(shared_data, tmp_path):
  """No model is given or loaded: the refusal comes before any decoding."""
  from configs import tiny
  d = shared_data / "mpii"
  with pytest.raises(errors.ConfigError, match="headbox_file"):
    evaluate.run(tiny.get_config(), str(tmp_path), progress=False,
                 dataset=f"mpii,json_file={d / 'test_mpii.json'},image_root={d}")


def test_mpii_box_pck_from_the_config_field(shared_data, tmp_path):
  """config.decode.mpii_box_pck asks for box PCK: the refusal is gone (the run then needs
  a model; this stops at loading it from a checkpoint that does not exist)."""
  from configs import tiny
  config = tiny.get_config().unlock()
  config.decode.mpii_box_pck = True
  d = shared_data / "mpii"
  with pytest.raises(errors.CheckpointError, match="no such checkpoint"):
    evaluate.run(config.lock(), str(tmp_path), progress=False, checkpoint=str(tmp_path / "x"),
                 dataset=f"mpii,json_file={d / 'test_mpii.json'},image_root={d}")


def test_malformed_results_name_the_field(shared_data):
  path = shared_data / "coco" / "test_coco.json"
  ann = json.loads(path.read_text())["annotations"][0]
  good = {"image_id": ann["image_id"], "category_id": 1, "keypoints": ann["keypoints"],
          "score": 1.0}
  for bad, field in [(dict(good, keypoints=ann["keypoints"][:-3]), "keypoints"),
                     (dict(good, keypoints=["x"] * 51), "keypoints"),
                     (dict(good, missing=[17]), "missing")]:
    with pytest.raises(errors.DataError, match=rf"results\[0\]\.{field}"):
      oks.coco_keypoint_ap(str(path), [bad])


def test_protocol_registry_picks_the_metrics_by_dataset_kind(shared_data):
  """The protocol is the registry entry of the records' kind (no dataset-name branch in
  the library): MPII -> PCKh (refused without head boxes), H36M -> MPJPE and no OKS AP,
  CrowdPose / AIC -> their AP settings, MP-100 -> the visual task, a kind the registry
  does not list -> COCO; a config's data.eval.protocol names another entry."""
  from configs import tiny
  d = shared_data / "mpii"
  mpii = read_dataset("mpii", ann_file=str(d / "test_mpii.json"), image_root=str(d))
  got = protocols.protocol_for(mpii)
  assert (got.name, got.oks_ap, got.pckh, got.needs_head_boxes) == ("mpii", None, True, True)
  kinds = {"h36m": (None, True, "keypoints"), "crowdpose": ("crowdpose", False, "keypoints"),
           "aic": ("aic", False, "keypoints"), "mp100": (None, False, "visual"),
           "humanart": ("coco", False, "keypoints"), "ap10k": ("coco", False, "keypoints")}
  for kind, expected in kinds.items():
    p = protocols.protocol_for([types.SimpleNamespace(dataset=kind)])
    assert (p.oks_ap, p.mpjpe, p.default_task) == expected, kind
  config = tiny.get_config().unlock()
  config.data.eval.protocol = "mp100"
  assert protocols.protocol_for(mpii, config).name == "mp100"
  with pytest.raises(errors.ConfigError, match="headbox_file"):
    protocols.check_protocol(mpii, protocol=protocols.protocol_for(mpii))
  protocols.check_protocol(mpii, protocol=protocols.protocol_for(mpii, config))  # no PCKh
  config.data.eval.protocol = "no-such-benchmark"
  with pytest.raises(errors.ConfigError, match="data.eval.protocol"):
    protocols.protocol_for(mpii, config)
  assert protocols.oks_ground_truth(mpii, protocols.protocol_for(mpii)) is None
