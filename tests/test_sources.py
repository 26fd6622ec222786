"""Dataset readers: every sample in shared/data loads with the counts of its files,
and each kind of bad input gives its documented outcome (DataError or counted skip)."""

import json
import os
import shutil

import ml_collections
import numpy as np
import pytest
import scipy.io
from PIL import Image

from kptjax.data.sources import (
    read_coco_keypoints,
    read_dataset,
    read_h36m,
    read_llava_captions,
    read_mp100,
    read_mpii_json,
)
from kptjax.data.sources import catalog
from kptjax.data.sources.h36m import frame_action, project
from kptjax.errors import ConfigError, DataError
from kptjax.keypoints import get_spec

# name, annotation file, image root, expected records, expected skips (SOURCES.md counts).
COCO_FORMAT = [
    ("coco", "coco/test_coco.json", "coco", 12, {"no_keypoints": 2}),  # 14 persons, 2 unlabeled
    ("humanart", "humanart/test_humanart.json", "humanart", 4, {}),
    ("ap10k", "ap10k/test_ap10k.json", "ap10k", 2, {}),
    ("crowdpose", "crowdpose/test_crowdpose.json", "crowdpose", 4, {"no_keypoints": 1}),
    ("ochuman", "ochuman/test_ochuman.json", "ochuman", 5, {}),
    ("aic", "aic/test_aic.json", "aic", 9, {}),
]


def _labeled(ann):
  return sum(1 for v in ann["keypoints"][2::3] if v > 0)


@pytest.mark.parametrize("name,ann,root,count,skipped", COCO_FORMAT)
def test_coco_format_samples_load_with_file_counts(shared_data, name, ann, root, count, skipped):
  records = read_dataset(name, shared_data / ann, shared_data / root)
  raw = json.loads((shared_data / ann).read_text())
  assert len(records) == count == sum(1 for a in raw["annotations"] if _labeled(a) > 0)
  assert dict(records.skipped) == skipped
  spec = get_spec(records[0].spec)
  by_id = {a["id"]: a for a in raw["annotations"]}
  for r in records:
    assert os.path.exists(r.image_path) and r.dataset == name
    assert r.keypoints.shape == (spec.num_keypoints, 3) and r.keypoints.dtype == np.float32
    np.testing.assert_array_equal(r.keypoints.ravel(), np.float32(by_id[r.ann_id]["keypoints"]))
    assert r.box[2] > 0 and r.box[3] > 0


def test_humanart_prefix_and_21_keypoints(shared_data):
  records = read_dataset("humanart", shared_data / "humanart/test_humanart.json",
                         shared_data / "humanart", spec="humanart21",
                         keypoints_field="keypoints_21")
  assert len(records) == 4 and records[0].keypoints.shape == (21, 3)
  # 'HumanArt/images/' is stripped from file_name, so the files are found under the root.
  assert all("HumanArt/images" not in r.image_path and os.path.exists(r.image_path)
             for r in records)
  assert sum(r.keypoints[17:, 2].max() > 0 for r in records) >= 1  # toes/fingers labeled


@pytest.mark.parametrize("name,ann,det,count", [
    ("coco", "coco/test_coco.json", "coco/test_coco_det_AP_H_56.json", 118),
    ("humanart", "humanart/test_humanart.json", "humanart/test_humanart_det_AP_H_56.json", 13),
    ("crowdpose", "crowdpose/test_crowdpose.json", "crowdpose/test_crowdpose_det_AP_40.json", 6),
])
def test_detection_files_and_score_threshold(shared_data, name, ann, det, count):
  root = shared_data / ann.split("/")[0]
  records = read_dataset(name, shared_data / ann, root, det_file=shared_data / det)
  assert len(records) == count and all(r.keypoints.max() == 0 for r in records)
  dets = json.loads((shared_data / det).read_text())
  kept = read_dataset(name, shared_data / ann, root, det_file=shared_data / det,
                      det_score_threshold=0.5)
  assert len(kept) == sum(d["score"] >= 0.5 for d in dets)
  assert kept.skipped["low_score"] == count - len(kept)
  assert sorted(r.score for r in kept) == sorted(d["score"] for d in dets if d["score"] >= 0.5)


def test_mpii_sample_and_head_boxes(shared_data, tmp_path):
  raw = json.loads((shared_data / "mpii/test_mpii.json").read_text())
  records = read_mpii_json(shared_data / "mpii/test_mpii.json", shared_data / "mpii")
  assert len(records) == 5 == len(raw) and not records.skipped
  r, entry = records[1], raw[1]
  np.testing.assert_allclose(r.keypoints[:, :2], np.float32(entry["joints"]) - 1)  # 0-based
  assert r.image_size == Image.open(shared_data / "mpii" / entry["image"]).size
  assert r.image_id == int(entry["image"][:-4])
  # The box is the HRNet crop before padding: square of 200 * scale px, center moved down.
  np.testing.assert_allclose(r.box[2:], [200 * entry["scale"]] * 2, rtol=1e-6)
  np.testing.assert_allclose(r.box[:2] + r.box[2:] / 2,
                             [entry["center"][0] - 1, entry["center"][1] + 15 * entry["scale"] - 1],
                             rtol=1e-6)
  boxes = np.arange(2 * 2 * 5, dtype=np.float64).reshape(2, 2, 5) + 1
  scipy.io.savemat(tmp_path / "mpii_gt_val.mat", {"headboxes_src": boxes})
  with_heads = read_mpii_json(shared_data / "mpii/test_mpii.json", shared_data / "mpii",
                              headbox_file=tmp_path / "mpii_gt_val.mat")
  np.testing.assert_allclose(with_heads[2].head_box,
                             [boxes[0, 0, 2] - 1, boxes[0, 1, 2] - 1, boxes[1, 0, 2] - 1,
                              boxes[1, 1, 2] - 1])
  scipy.io.savemat(tmp_path / "short.mat", {"headboxes_src": boxes[..., :4]})
  with pytest.raises(DataError) as err:
    read_mpii_json(shared_data / "mpii/test_mpii.json", shared_data / "mpii",
                   headbox_file=tmp_path / "short.mat")
  assert err.value.field == "headboxes_src" and "short.mat" in str(err.value)


def test_h36m_json_and_npz_forms_agree(shared_data):
  cams = shared_data / "h36m/cameras.from_pkl.json"
  from_json = read_h36m(shared_data / "h36m/h36m_coco.json", shared_data / "h36m",
                        camera_file=cams)
  from_npz = read_dataset("h36m", shared_data / "h36m/test_h36m_body3d.npz", shared_data / "h36m",
                          camera_file=cams)
  assert len(from_json) == len(from_npz) == 4
  for a, b in zip(from_json, from_npz):
    assert a.image_path == b.image_path and os.path.exists(a.image_path)
    # World metres -> camera millimetres reproduces the npz's camera-frame joints.
    np.testing.assert_allclose(a.keypoints_3d, b.keypoints_3d, atol=0.01)
    np.testing.assert_allclose(a.keypoints, b.keypoints)
    # The pinhole projection lands on the 2D labels (up to lens distortion).
    assert np.abs(project(a.keypoints_3d[:, :3], a.camera) - a.keypoints[:, :2]).max() < 3.0
    assert 4000 < a.keypoints_3d[0, 2] < 7000  # root depth in mm
  no_cams = read_h36m(shared_data / "h36m/h36m_coco.json", shared_data / "h36m")
  assert no_cams[0].keypoints_3d is None and no_cams[0].camera is None


def test_llava_captions(tmp_path, shared_data):
  shutil.copy(shared_data / "coco/000000000785.jpg", tmp_path / "a.jpg")
  entries = [
      {"id": "1", "image": "a.jpg", "conversations": [
          {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A skier."}]},
      {"image": "a.jpg", "caption": "Snow."},
      {"id": "3", "image": "absent.jpg", "caption": "x"},
      {"id": "4", "image": "a.jpg", "conversations": [{"from": "human", "value": "hi"}]},
  ]
  (tmp_path / "chat.json").write_text(json.dumps(entries))
  records = read_dataset("llava", tmp_path / "chat.json", tmp_path)
  assert [r.caption for r in records] == ["A skier.", "Snow."]
  assert records[0].image_path == str(tmp_path / "a.jpg") and records[0].id == "1"
  assert dict(records.skipped) == {"missing_image": 1, "no_caption": 1}
  (tmp_path / "bad.json").write_text(json.dumps([{"image": "a.jpg", "conversations": "x"}]))
  with pytest.raises(DataError) as err:
    read_llava_captions(tmp_path / "bad.json", tmp_path)
  assert err.value.field == "[0].conversations"


def test_mp100_makes_one_spec_per_category(tmp_path, shared_data):
  shutil.copy(shared_data / "coco/000000000785.jpg", tmp_path / "a.jpg")
  data = {
      "images": [{"id": 7, "file_name": "a.jpg", "width": 640, "height": 425}],
      "categories": [
          {"id": 1, "name": "chair", "keypoints": ["left_front_leg", "right_front_leg", "seat"],
           "skeleton": [[1, 3], [2, 3]],
           "keypoint_descriptions": ["Front left leg tip.", "Front right leg tip.", "Seat center."]},
          {"id": 2, "name": "bird_body", "keypoints": ["beak", "tail"]}],
      "annotations": [
          {"id": 1, "image_id": 7, "category_id": 1, "bbox": [10, 10, 100, 100],
           "keypoints": [20, 20, 2, 80, 20, 2, 50, 50, 2]},
          {"id": 2, "image_id": 7, "category_id": 2, "bbox": [200, 10, 50, 50],
           "keypoints": [210, 20, 2, 0, 0, 0]}],
  }
  (tmp_path / "mp100.json").write_text(json.dumps(data))
  records = read_mp100(tmp_path / "mp100.json", tmp_path)
  assert len(records) == 2 and set(records.specs) == {"mp100/chair", "mp100/bird_body"}
  chair = get_spec("mp100/chair")
  assert chair.names == ("left front leg", "right front leg", "seat") and chair.flip_pairs == ((0, 1),)
  assert chair.descriptions[2] == "Seat center." and chair.skeleton == ((0, 2), (1, 2))
  assert chair.subject == "chair" and get_spec("mp100/bird_body").subject == "bird body"
  assert records[1].spec == "mp100/bird_body" and records[1].keypoints.shape == (2, 3)


# ----------------------------------------------------------------------------- bad input


@pytest.fixture()
def coco_copy(shared_data, tmp_path):
  """The COCO sample json (as a dict) and a writer that saves a modified copy."""
  data = json.loads((shared_data / "coco/test_coco.json").read_text())
  def write(d):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(d))
    return path
  return data, write, shared_data / "coco"


def test_malformed_json_names_the_file(tmp_path, shared_data):
  path = tmp_path / "broken.json"
  path.write_text((shared_data / "coco/test_coco.json").read_text()[:5000])
  for reader in (read_coco_keypoints, read_mpii_json, read_llava_captions, read_h36m):
    with pytest.raises(DataError, match="malformed JSON") as err:
      reader(path, shared_data / "coco")
    assert err.value.path == str(path)
  with pytest.raises(DataError, match="file not found"):
    read_coco_keypoints(tmp_path / "absent.json", tmp_path)


def test_missing_and_mistyped_fields_name_the_field(coco_copy):
  data, write, root = coco_copy
  del data["annotations"][3]["bbox"]
  with pytest.raises(DataError) as err:
    read_coco_keypoints(write(data), root)
  assert err.value.field == "annotations[3].bbox"
  data["annotations"][3]["bbox"] = [1, 2, 3, 4]
  data["annotations"][0]["keypoints"] = data["annotations"][0]["keypoints"][:-3]
  with pytest.raises(DataError, match="51 numbers") as err:
    read_coco_keypoints(write(data), root)
  assert err.value.field == "annotations[0].keypoints"
  data["annotations"][0]["keypoints"] += [0, 0, 0]
  data["images"][1]["width"] = "wide"
  with pytest.raises(DataError) as err:
    read_coco_keypoints(write(data), root)
  assert err.value.field == "images[1].width"


def test_missing_image_is_a_counted_skip(coco_copy):
  data, write, root = coco_copy
  data["images"][0]["file_name"] = "no_such_image.jpg"
  n = sum(1 for a in data["annotations"] if a["image_id"] == data["images"][0]["id"]
          and _labeled(a) > 0)
  records = read_coco_keypoints(write(data), root)
  assert records.skipped["missing_image"] == n > 0 and len(records) == 12 - n
  assert len(read_coco_keypoints(write(data), root, check_images=False)) == 12


def test_zero_area_box_is_a_counted_skip(coco_copy):
  data, write, root = coco_copy
  target = next(a for a in data["annotations"] if _labeled(a) > 0)
  target["bbox"][2] = 0.0
  records = read_coco_keypoints(write(data), root)
  assert records.skipped["zero_area"] == 1 and len(records) == 11
  assert target["id"] not in {r.ann_id for r in records}


def test_unlabeled_persons_skipped_by_default_kept_on_request(coco_copy):
  data, write, root = coco_copy
  path = write(data)
  assert read_coco_keypoints(path, root).skipped["no_keypoints"] == 2
  kept = read_coco_keypoints(path, root, min_keypoints=0)
  assert len(kept) == 14 and not kept.skipped
  assert sum(1 for r in kept if r.keypoints[:, 2].max() == 0) == 2


def test_unknown_source_name_is_a_config_error(shared_data):
  with pytest.raises(ConfigError, match="unknown data source"):
    read_dataset("imagenet", "x", "y")
  with pytest.raises(ConfigError, match="no_such_option"):
    read_dataset("coco", shared_data / "coco/test_coco.json", shared_data / "coco",
                 no_such_option=1)
  records = read_dataset("coco", ann_file=shared_data / "coco/test_coco.json",
                         image_root=shared_data / "coco")
  assert len(records) == 12
  # Strings from a command line take the type of the reader's default.
  records = read_dataset("coco", ann_file=str(shared_data / "coco/test_coco.json"),
                         image_root=str(shared_data / "coco"), min_keypoints="0",
                         check_images="false")
  assert len(records) == 14
  with pytest.raises(ConfigError, match="min_keypoints"):
    read_dataset("coco", shared_data / "coco/test_coco.json", shared_data / "coco",
                 min_keypoints="many")


def test_catalog_layouts_options_and_detections():
  entry = ml_collections.ConfigDict(dict(source="mp100", path="/d", split="val", det_file="",
                                         options="min_keypoints=0,note=a b"))
  reader, files, options = catalog.locate(entry, "eval")
  assert reader == "mp100" and files == ("/d/annotations/val.json", "/d/images")
  assert options == {"min_keypoints": 0, "note": "a b"}
  entry.update(source="crowdpose", det_file="/det.json", options="det_score_threshold=0.5")
  reader, files, options = catalog.locate(entry, "eval")
  assert reader == "crowdpose"
  assert files == ("/d/annotations/person_keypoints_val.json", "/d/val")
  assert options == {"det_file": "/det.json", "det_score_threshold": 0.5}   # options win
  assert catalog.CATALOG["synthetic_objects"].reader == "mp100"
  with pytest.raises(ConfigError, match="not key=value"):
    catalog.parse_options("min_keypoints")


def test_h36m_frame_action():
  assert frame_action("S1/S1_Directions_1.54138969_000001.jpg") == "Directions"
  assert frame_action("S8_WalkDog.55011271_000026.jpg") == "WalkDog"
  assert frame_action("000000000785.jpg") == "unknown"
