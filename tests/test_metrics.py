"""Metrics against pycocotools run directly and against small hand-computed cases."""

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from kptjax import errors
from kptjax.evaluation import metrics, oks

# Published OKS sigmas, copied from their definitions:


# Published OKS sigmas, copied from their definitions:
# COCO: pycocotools/cocoeval.py Params.setKpParams (also Human-Art's 17 and OCHuman).
COCO_SIGMAS = [v / 10 for v in (.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07,
                                 1.07, .87, .87, .89, .89)]
# AP-10K: mmpose configs/_base_/datasets/ap10k.py.
AP10K_SIGMAS = [0.025, 0.025, 0.026, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072, 0.062, 0.062,
                0.107, 0.107, 0.087, 0.087, 0.089, 0.089]
# CrowdPose: mmpose configs/_base_/datasets/crowdpose.py (crowdposetools' values).
CROWDPOSE_SIGMAS = [0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107, 0.107, 0.087, 0.087,
                    0.089, 0.089, 0.079, 0.079]


def _direct_cocoeval(gt_path, results, tmp_path, sigmas=None):
  """The official route: files on disk, COCO(), loadRes(path), COCOeval."""
  res_path = tmp_path / "res.json"
  res_path.write_text(json.dumps(results))
  with contextlib.redirect_stdout(io.StringIO()):
    gt = COCO(str(gt_path))
    dt = gt.loadRes(str(res_path))
    ev = COCOeval(gt, dt, "keypoints")
    if sigmas is not None:
      ev.params.kpt_oks_sigmas = np.array(sigmas)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return list(ev.stats)


def _results_from_gt(gt_json, rng, jitter_px=0.0, drop_every=0):
  out = []
  for i, ann in enumerate(gt_json["annotations"]):
    if ann["num_keypoints"] == 0 or (drop_every and i % drop_every == 0):
      continue
    kp = np.array(ann["keypoints"], np.float64).reshape(-1, 3)
    xy = kp[:, :2] + rng.normal(0, jitter_px, kp[:, :2].shape) * (jitter_px > 0)
    scores = rng.uniform(0.3, 1.0, len(kp))
    out.append(oks.coco_result(ann["image_id"], np.c_[xy, scores], float(scores.mean())))
  return out


@pytest.mark.parametrize("case", ["perfect", "jittered", "missing"])
def test_coco_ap_equals_direct_pycocotools(shared_data, tmp_path, case):
  gt_path = shared_data / "coco" / "test_coco.json"
  gt_json = json.loads(gt_path.read_text())
  rng = np.random.default_rng(0)
  results = _results_from_gt(gt_json, rng, jitter_px={"perfect": 0, "jittered": 6,
                                                      "missing": 3}[case],
                             drop_every=3 if case == "missing" else 0)
  ours = oks.coco_keypoint_ap(str(gt_path), results, sigmas=COCO_SIGMAS)
  ref = _direct_cocoeval(gt_path, results, tmp_path)
  assert [ours[k] for k in oks.COCO_AP_NAMES] == pytest.approx(ref, abs=0, rel=0)
  if case == "perfect":
    assert ours["AP"] == pytest.approx(1.0)
  else:
    assert ours["AP"] < 1.0


def test_coco_ap_other_sigmas_crowdpose(shared_data, tmp_path):
  """14-keypoint data: our sigmas reach the evaluator (perfect = 1; jittered equals
  xtcocotools' keypoints_crowd, mmpose's CrowdPose setting, run directly)."""
  from xtcocotools.coco import COCO as XtCOCO
  from xtcocotools.cocoeval import COCOeval as XtCOCOeval
  gt_path = shared_data / "crowdpose" / "test_crowdpose.json"
  gt_json = json.loads(gt_path.read_text())
  perfect = _results_from_gt(gt_json, np.random.default_rng(1))
  assert oks.coco_keypoint_ap(str(gt_path), perfect, CROWDPOSE_SIGMAS,
                              protocol="crowdpose")["AP"] == pytest.approx(1.0)
  jittered = _results_from_gt(gt_json, np.random.default_rng(1), jitter_px=5)
  ours = oks.coco_keypoint_ap(gt_json, jittered, CROWDPOSE_SIGMAS, protocol="crowdpose")
  (tmp_path / "res.json").write_text(json.dumps(jittered))
  with contextlib.redirect_stdout(io.StringIO()):
    gt = XtCOCO(str(gt_path))
    ev = XtCOCOeval(gt, gt.loadRes(str(tmp_path / "res.json")), "keypoints_crowd",
                    np.array(CROWDPOSE_SIGMAS), use_area=False)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  assert [ours[k] for k in oks.CROWDPOSE_AP_NAMES] == pytest.approx(list(ev.stats), abs=1e-6)


def test_coco_protocol_needs_area(shared_data):
  """COCO's protocol reads each annotation's area; a file without (CrowdPose) is refused
  with the field named, not a KeyError from inside pycocotools."""
  gt_path = shared_data / "crowdpose" / "test_crowdpose.json"
  results = _results_from_gt(json.loads(gt_path.read_text()), np.random.default_rng(1))
  with pytest.raises(errors.DataError, match="area"):
    oks.coco_keypoint_ap(str(gt_path), results, CROWDPOSE_SIGMAS)


def test_coco_ap_no_results_is_zero(shared_data):
  out = oks.coco_keypoint_ap(shared_data / "coco" / "test_coco.json", [])
  assert out == {k: 0.0 for k in oks.COCO_AP_NAMES}


def test_pycocotools_default_sigmas_are_coco():
  from pycocotools.cocoeval import Params
  np.testing.assert_allclose(Params("keypoints").kpt_oks_sigmas, np.array(COCO_SIGMAS))


def test_pck_hand_computed():
  # One person, box 100x50 -> normalizer 100 px. Errors: 0, 4, 8, 12, 30 px; last invisible.
  gt = np.zeros((1, 5, 2))
  pred = gt + np.array([[0, 0], [4, 0], [0, 8], [12, 0], [30, 0]])[None]
  vis = np.array([[1, 1, 1, 1, 0]], bool)
  out = metrics.box_pck(pred, gt, vis, np.array([[10, 10, 100, 50]]))
  assert out["count"] == 4
  assert out["PCK@0.05"] == pytest.approx(2 / 4)   # 0, 4
  assert out["PCK@0.1"] == pytest.approx(3 / 4)    # + 8
  assert out["PCK@0.15"] == pytest.approx(4 / 4)   # + 12
  assert out["per_keypoint"]["PCK@0.05"][:4] == [1.0, 1.0, 0.0, 0.0]
  assert np.isnan(out["per_keypoint"]["PCK@0.05"][4])


def test_pckh_hand_computed():
  # Two people, 16 MPII joints. Head box diagonal 50 px -> normalizer 0.6 * 50 = 30 px.
  n, k = 2, 16
  gt = np.zeros((n, k, 2))
  pred = gt.copy()
  pred[0, :, 0] = 10.0          # person 0: every joint 10 px off: <= 15 (0.5), > 3 (0.1)
  pred[1, :, 0] = 20.0          # person 1: 20 px off: > 15 -> wrong at 0.5
  pred[1, 12, 0] = 2.0          # ... except its right shoulder, 2 px: right at both
  vis = np.ones((n, k), bool)
  vis[1, 0] = False             # person 1's right ankle unlabelled
  boxes = np.array([[0, 0, 30, 40], [100, 100, 130, 140]], np.float64)  # diag 50
  out = metrics.pckh(pred, gt, vis, boxes, variant="standard")
  # Per joint @0.5: joint 0 -> 1/1 = 100; joint 12 -> 2/2 = 100; others 1/2 = 50.
  per = np.full(16, 50.0)
  per[[0, 12]] = 100.0
  np.testing.assert_allclose(out["per_keypoint"]["PCKh@0.5"], per)
  counts = np.full(16, 2.0)
  counts[0] = 1.0
  keep = np.ones(16, bool)
  keep[[6, 7]] = False
  assert out["PCKh@0.5"] == pytest.approx(np.sum(per[keep] * counts[keep]) / counts[keep].sum())
  assert out["PCKh@0.5/Shoulder"] == pytest.approx(75.0)
  assert out["PCKh@0.5/Ankle"] == pytest.approx(75.0)
  # @0.1 (3 px): only person 1's right shoulder.
  per01 = np.zeros(16)
  per01[12] = 50.0
  np.testing.assert_allclose(out["per_keypoint"]["PCKh@0.1"], per01)
  # LocLLM's mean leaves out pelvis, thorax, neck and head top too.
  loc = metrics.pckh(pred, gt, vis, boxes, variant="locllm")
  keep[[8, 9]] = False
  assert loc["PCKh@0.5"] == pytest.approx(np.sum(per[keep] * counts[keep]) / counts[keep].sum())
  assert "PCKh@0.1(locllm)" in loc


def test_pck_missing_is_a_miss_and_nan_is_refused():
  gt = np.zeros((1, 5, 2))
  pred = gt + np.array([[0, 0], [4, 0], [0, 8], [12, 0], [30, 0]])[None]
  vis = np.array([[1, 1, 1, 1, 0]], bool)
  box = np.array([[10, 10, 100, 50]])
  missing = np.array([[True, False, False, False, False]])
  pred[0, 0] = np.nan                       # the value of a missing keypoint is not read
  out = metrics.box_pck(pred, gt, vis, box, missing=missing)
  assert out["count"] == 4 and out["missing"] == 1
  assert out["PCK@0.05"] == pytest.approx(1 / 4)   # keypoint 0 would have hit (error 0)
  assert out["per_keypoint"]["PCK@0.05"][0] == 0.0
  with pytest.raises(errors.DataError, match="'pred'.*person 0, keypoint 0"):
    metrics.box_pck(pred, gt, vis, box)
  pred[0, 0] = np.inf
  with pytest.raises(errors.DataError, match="non-finite"):
    metrics.pckh(np.tile(pred[:, :1], (1, 16, 1)), np.zeros((1, 16, 2)), np.ones((1, 16), bool),
                 np.array([[0, 0, 30, 40]]))


def test_mpjpe_counts_missing_joints():
  rng = np.random.default_rng(0)
  gt = rng.normal(0, 300, (2, 17, 3))
  pred = gt.copy()
  pred[0, 5] += [30, 40, 0]                 # 50 mm off, but missing: not averaged
  missing = np.zeros((2, 17), bool)
  missing[0, 5] = True
  pred[0, 5] = np.nan
  missing[1, 0] = True                      # the root of pose 1: nothing to align it with
  out = metrics.mpjpe(pred, gt, missing=missing)
  assert out["MPJPE"] == pytest.approx(0.0, abs=1e-9)
  assert out["missing_joints"] == 1 + 17 and out["missing_poses"] == 1
  per = np.array(out["per_keypoint_MPJPE"])      # joint 5 never scored: NaN, not a number
  assert np.isnan(per[5]) and np.isfinite(np.delete(per, 5)).all()
  with pytest.raises(errors.DataError, match="non-finite"):
    metrics.mpjpe(pred, gt)


def test_mpjpe_hand_computed():
  rng = np.random.default_rng(0)
  gt = rng.normal(0, 300, (3, 17, 3))
  pred = gt.copy()
  pred[0, 5] += [30, 40, 0]          # pose 0: one joint 50 mm off -> 50 / 17
  pred[1] += [100, -50, 20]          # pose 1: a pure translation -> 0 after root alignment
  theta = 0.3                        # pose 2: rotated, scaled, shifted -> PA-MPJPE 0
  rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0],
                  [0, 0, 1]])
  pred[2] = 1.2 * gt[2] @ rot + 7.0
  out = metrics.mpjpe(pred, gt, actions=["Walk", "Walk", "Sit"])
  assert out["per_action"]["Walk"]["MPJPE"] == pytest.approx((50 / 17 + 0) / 2)
  assert out["per_action"]["Sit"]["PA-MPJPE"] == pytest.approx(0, abs=1e-6)
  assert out["per_action"]["Sit"]["MPJPE"] > 10
  assert out["per_action"]["Walk"]["count"] == 2
  # Procrustes is the least-squares optimum: no worse in squared error than no alignment.
  aligned = metrics.procrustes_align(pred[0], gt[0])
  assert np.sum((aligned - gt[0]) ** 2) <= np.sum((pred[0] - gt[0]) ** 2)


def test_h36m_action_from_name():
  assert metrics.h36m_action("S1/S1_Directions_1.54138969_000001.jpg") == "Directions"
  assert metrics.h36m_action("S8_WalkDog_1.55011271_000026.jpg") == "WalkDog"


def test_markdown_table():
  table = metrics.markdown_table([{"a": 1.23456, "b": "x"}, {"a": None, "b": "y"}])
  assert table.splitlines() == ["| a | b |", "|---|---|", "| 1.235 | x |", "|  | y |"]


# AIC: mmpose configs/_base_/datasets/aic.py.
AIC_SIGMAS = [0.01388152, 0.01515228, 0.01057665, 0.01417709, 0.01497891, 0.01402144,
              0.03909642, 0.03686941, 0.01981803, 0.03843971, 0.03412318, 0.02415081,
              0.01291456, 0.01236173]


@pytest.mark.parametrize("spec_name,expected", [
    ("coco17", COCO_SIGMAS),          # COCO, Human-Art (its 17 COCO keypoints), OCHuman
    ("ap10k17", AP10K_SIGMAS),
    ("crowdpose14", CROWDPOSE_SIGMAS),
    ("aic14", AIC_SIGMAS),
])
def test_spec_oks_sigmas_match_their_definitions(spec_name, expected):
  from kptjax.keypoints import get_spec
  np.testing.assert_allclose(get_spec(spec_name).sigmas, expected, rtol=0, atol=1e-9)


def test_missing_keypoints_are_pck_misses_whatever_their_values():
  """A missing prediction counts in the denominator and is never a hit, even when its
  (unused) value sits on the ground truth."""
  gt = np.zeros((2, 2, 2))
  pred = gt.copy()
  missing = np.array([[True, False], [False, False]])
  out = metrics.box_pck(pred, gt, np.ones((2, 2), bool), np.array([[0, 0, 10, 10]] * 2),
                        (0.1,), missing=missing)
  assert out["PCK@0.1"] == 0.75 and out["count"] == 4
  assert out["per_keypoint"]["PCK@0.1"] == [0.5, 1.0]


def test_mpjpe_counts_missing_joints_instead_of_averaging_them():
  """Pose 0: joint 2 missing (its junk value is not read) -> MPJPE over joints 0, 1;
  pose 1: root missing -> cannot be root-aligned, all its joints missing, pose left out."""
  gt = np.zeros((2, 3, 3))
  gt[:, 1] = [100, 0, 0]
  gt[:, 2] = [0, 100, 0]
  pred = gt.copy()
  pred[0, 1] += [0, 30, 0]                       # 30 mm off, root exact
  pred[0, 2] = 1e6
  missing = np.array([[False, False, True], [True, False, False]])
  out = metrics.mpjpe(pred, gt, ["A", "A"], root=0, missing=missing)
  assert out["MPJPE"] == pytest.approx(15.0)     # (0 + 30) / 2 over pose 0
  assert out["missing_joints"] == 4 and out["missing_poses"] == 1
  assert out["per_action"]["A"]["count"] == 1
  assert np.isfinite(out["PA-MPJPE"])
  assert out["per_keypoint_MPJPE"][:2] == pytest.approx([0.0, 30.0])


def test_coco_result_missing_keypoints_are_zero_and_listed():
  r = oks.coco_result(3, np.array([[10, 20, 0.9], [30, 40, 0.8]]), 0.7,
                      missing=np.array([False, True]))
  assert r["keypoints"] == [10, 20, 0.9, 0, 0, 0] and r["missing"] == [1]
