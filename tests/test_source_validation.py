"""Readers refuse what is not a number (kptjax/data/sources/fields.py).

Each case starts from a real sample in shared/data (or, for MP-100, a file written here
over a real image), breaks one field of a copy in tmp_path, and asserts the reader's
DataError: its path is the broken file, its field (and, where there is one, its record)
is the broken one, and the message says both. NaN / inf are written as JSON's ``NaN`` /
``Infinity``, which Python's json (and so every reader before this check) accepts as
numbers. Every case here was accepted, or ended in a raw exception (ValueError,
OverflowError, RecursionError, TypeError, AttributeError, IndexError, BadZipFile), before.
"""

import copy
import json
import math
import shutil

import numpy as np
import pytest
import scipy.io

from kptjax.data.sources import (
    read_dataset,
    read_h36m,
    read_llava_captions,
    read_mp100,
    read_mpii_json,
)
from kptjax.data.sources.ap10k import read_ap10k_families
from kptjax.errors import DataError

NAN, INF = math.nan, math.inf

COCO_FORMAT = {
    "coco": ("coco/test_coco.json", "coco"),
    "humanart": ("humanart/test_humanart.json", "humanart"),
    "ap10k": ("ap10k/test_ap10k.json", "ap10k"),
    "crowdpose": ("crowdpose/test_crowdpose.json", "crowdpose"),
    "ochuman": ("ochuman/test_ochuman.json", "ochuman"),
    "aic": ("aic/test_aic.json", "aic"),
}


def _write(path, data):
  path.write_text(json.dumps(data))   # allow_nan: NaN / Infinity, as a bad file holds them
  return path


def _refused(call, path, field, record=..., match=None):
  """call() raises DataError naming ``path`` and ``field`` (and ``record`` when given)."""
  with pytest.raises(DataError) as err:
    call()
  e, text = err.value, str(err.value)
  assert e.path == str(path) and str(path) in text
  assert e.field == field, text
  if field is not None:
    assert f"field '{field}'" in text
  if record is not ...:
    assert e.record == record and f"record {record}" in text, text
  if match is not None:
    assert match in text, text
  return e


def _first_person(data):
  """Index of the first annotation the reader keeps (labeled, not crowd)."""
  return next(i for i, a in enumerate(data["annotations"])
              if not a.get("iscrowd") and any(v > 0 for v in a["keypoints"][2::3]))


def _set(d, keys, value):
  for k in keys[:-1]:
    d = d[k]
  d[keys[-1]] = value


# (case, mutation of the parsed file -> (field, record)), k = the first kept annotation.
def _ann(k, key, index, value):
  def mutate(d):
    if index is None:
      d["annotations"][k][key] = value
    else:
      d["annotations"][k][key][index] = value
    return f"annotations[{k}].{key}", d["annotations"][k]["id"]
  return mutate


def _image(key, value):
  def mutate(d):
    d["images"][0][key] = value
    return f"images[0].{key}", d["images"][0]["id"]
  return mutate


def _duplicate(section):
  def mutate(d):
    d[section][1]["id"] = d[section][0]["id"]
    # An annotation or image id is its record; a category is no record.
    return f"{section}[1].id", ... if section == "categories" else d[section][0]["id"]
  return mutate


def _visibility(k, value):
  def mutate(d):
    d["annotations"][k]["keypoints"][2] = value
    return f"annotations[{k}].keypoints[visibility]", d["annotations"][k]["id"]
  return mutate


def _category(k, value):
  def mutate(d):
    d["annotations"][k]["category_id"] = value
    return f"annotations[{k}].category_id", d["annotations"][k]["id"]
  return mutate


def _categories(value, field):
  def mutate(d):
    if field == "categories":
      d["categories"] = value
    else:
      d["categories"][0] = value
    return field, ...
  return mutate


COCO_CASES = {
    "keypoint_x_nan": lambda k: _ann(k, "keypoints", 0, NAN),
    "keypoint_y_inf": lambda k: _ann(k, "keypoints", 1, INF),
    "visibility_3": lambda k: _visibility(k, 3),
    "visibility_half": lambda k: _visibility(k, 0.5),
    "bbox_nan": lambda k: _ann(k, "bbox", 2, NAN),
    "bbox_minus_inf": lambda k: _ann(k, "bbox", 0, -INF),
    "area_nan": lambda k: _ann(k, "area", None, NAN),
    "area_inf": lambda k: _ann(k, "area", None, INF),
    "width_nan": lambda k: _image("width", NAN),
    "height_inf": lambda k: _image("height", INF),
    "width_zero": lambda k: _image("width", 0),
    "width_fractional": lambda k: _image("width", 640.5),
    "duplicate_annotation_id": lambda k: _duplicate("annotations"),
    "duplicate_image_id": lambda k: _duplicate("images"),
    "unknown_category_id": lambda k: _category(k, 999),
    "category_not_an_object": lambda k: _categories("person", "categories[0]"),
    "categories_not_a_list": lambda k: _categories(5, "categories"),
}


@pytest.mark.parametrize("case", sorted(COCO_CASES))
@pytest.mark.parametrize("name", sorted(COCO_FORMAT))
def test_coco_format_readers_refuse_bad_numbers_ids_and_categories(shared_data, tmp_path,
                                                                   name, case):
  ann, root = COCO_FORMAT[name]
  data = json.loads((shared_data / ann).read_text())
  field, record = COCO_CASES[case](_first_person(data))(data)
  path = _write(tmp_path / "ann.json", data)
  _refused(lambda: read_dataset(name, path, shared_data / root), path, field, record)


@pytest.mark.parametrize("name", sorted(COCO_FORMAT))
def test_deeply_nested_json_is_a_data_error(shared_data, tmp_path, name):
  path = tmp_path / "deep.json"
  path.write_text('{"images": ' + "[" * 100_000 + "]" * 100_000 + "}")
  _refused(lambda: read_dataset(name, path, shared_data / COCO_FORMAT[name][1]), path, None,
           match="nested too deeply")


# ------------------------------------------------------------------------ detections

DET_CASES = {
    "score_nan": ("score", NAN),
    "score_above_one": ("score", 1.5),
    "score_negative": ("score", -0.1),
    "bbox_inf": ("bbox", [10.0, 10.0, INF, 50.0]),
    "bbox_nan": ("bbox", [NAN, 10.0, 50.0, 50.0]),
    "unknown_category_id": ("category_id", 7),
}


@pytest.mark.parametrize("case", sorted(DET_CASES))
def test_detection_file_refuses_bad_scores_boxes_and_categories(shared_data, tmp_path, case):
  key, value = DET_CASES[case]
  dets = json.loads((shared_data / "coco/test_coco_det_AP_H_56.json").read_text())
  dets[5][key] = value
  path = _write(tmp_path / "dets.json", dets)
  _refused(lambda: read_dataset("coco", shared_data / "coco/test_coco.json",
                                shared_data / "coco", det_file=path), path, f"[5].{key}")


# ------------------------------------------------------------------------------ MPII

MPII_CASES = {
    "joints_not_numbers": ("joints", 0, ["a", "b"]),
    "joint_nan": ("joints", 3, [NAN, 100.0]),
    "joint_inf": ("joints", 3, [100.0, INF]),
    "scale_nan": ("scale", None, NAN),
    "scale_inf": ("scale", None, INF),
    "center_inf": ("center", 0, INF),
    "joints_vis_3": ("joints_vis", 4, 3),
    "joints_vis_nan": ("joints_vis", 4, NAN),
}


@pytest.mark.parametrize("case", sorted(MPII_CASES))
def test_mpii_refuses_bad_joints_centers_and_scales(shared_data, tmp_path, case):
  key, index, value = MPII_CASES[case]
  entries = json.loads((shared_data / "mpii/test_mpii.json").read_text())
  if index is None:
    entries[2][key] = value
  else:
    entries[2][key][index] = value
  path = _write(tmp_path / "mpii.json", entries)
  _refused(lambda: read_mpii_json(path, shared_data / "mpii"), path, f"[2].{key}", 2)


def test_mpii_head_box_file_that_is_not_a_mat(shared_data, tmp_path):
  for name, content in (("short.mat", b"not a MATLAB file"),      # scipy: IndexError
                        ("text.mat", b"not a MATLAB file\n" * 20),
                        ("json.mat", (shared_data / "mpii/test_mpii.json").read_bytes())):
    path = tmp_path / name
    path.write_bytes(content)
    _refused(lambda: read_mpii_json(shared_data / "mpii/test_mpii.json", shared_data / "mpii",
                                    headbox_file=path), path, None, match="MATLAB")


def test_mpii_head_boxes_must_be_finite(shared_data, tmp_path):
  boxes = np.zeros((2, 2, 5))            # (top-left, bottom-right) x (x, y) x person
  boxes[0], boxes[1] = 10.0, 60.0
  boxes[1, 0, 3] = np.nan
  path = tmp_path / "gt.mat"
  scipy.io.savemat(path, {"headboxes_src": boxes})
  _refused(lambda: read_mpii_json(shared_data / "mpii/test_mpii.json", shared_data / "mpii",
                                  headbox_file=path), path, "headboxes_src")


# --------------------------------------------------------------------------- Human3.6M


def _h36m_json(shared_data):
  return json.loads((shared_data / "h36m/h36m_coco.json").read_text())


H36M_JSON_CASES = {
    "keypoint_nan": lambda d: _ann(0, "keypoints", 4, NAN)(d),
    "visibility_3": lambda d: _visibility(0, 3)(d),
    "keypoints_3d_inf": lambda d: _ann(0, "keypoints_3d", 6, INF)(d),
    "bbox_nan": lambda d: _ann(0, "bbox", 3, NAN)(d),
    "width_nan": lambda d: _image("width", NAN)(d),
    "duplicate_annotation_id": lambda d: _duplicate("annotations")(d),
    "duplicate_image_id": lambda d: _duplicate("images")(d),
}


@pytest.mark.parametrize("case", sorted(H36M_JSON_CASES))
def test_h36m_json_refuses_bad_numbers_and_ids(shared_data, tmp_path, case):
  data = _h36m_json(shared_data)
  field, record = H36M_JSON_CASES[case](data)
  path = _write(tmp_path / "h36m.json", data)
  _refused(lambda: read_h36m(path, shared_data / "h36m",
                             camera_file=shared_data / "h36m/cameras.from_pkl.json"),
           path, field, record)


@pytest.mark.parametrize("name,index,value", [("f", 0, NAN), ("f", 1, 0.0), ("R", 4, INF),
                                              ("T", 2, NAN), ("c", 0, -INF)])
def test_h36m_cameras_must_be_finite(shared_data, tmp_path, name, index, value):
  cams = json.loads((shared_data / "h36m/cameras.from_pkl.json").read_text())
  key = "S1|54138969"
  flat = np.asarray(cams["cameras"][key][name], np.float64).ravel().tolist()
  flat[index] = value
  cams["cameras"][key][name] = flat
  path = _write(tmp_path / "cameras.json", cams)
  _refused(lambda: read_h36m(shared_data / "h36m/h36m_coco.json", shared_data / "h36m",
                             camera_file=path), path, f"cameras.{key}.{name}")


def _npz(shared_data):
  with np.load(shared_data / "h36m/test_h36m_body3d.npz") as f:
    return {k: f[k].copy() for k in f.files}


H36M_NPZ_CASES = {
    "part_nan": ("part", (2, 5, 0), NAN, "part"),
    "part_visibility_3": ("part", (2, 5, 2), 3.0, "part[visibility]"),
    "S_inf": ("S", (2, 1, 2), INF, "S"),
    "scale_nan": ("scale", (2,), NAN, "scale"),
    "center_inf": ("center", (2, 1), INF, "center"),
}


@pytest.mark.parametrize("case", sorted(H36M_NPZ_CASES))
def test_h36m_npz_refuses_non_finite_arrays_naming_the_row(shared_data, tmp_path, case):
  key, where, value, field = H36M_NPZ_CASES[case]
  arrays = _npz(shared_data)
  arrays[key][where] = value
  path = tmp_path / "h36m.npz"
  np.savez(path, **arrays)
  _refused(lambda: read_h36m(path, shared_data / "h36m"), path, field, 2)


def test_h36m_npz_truncated_or_mistyped(shared_data, tmp_path):
  data = (shared_data / "h36m/test_h36m_body3d.npz").read_bytes()
  for cut in (len(data) // 2, 100):
    path = tmp_path / f"cut{cut}.npz"
    path.write_bytes(data[:cut])
    _refused(lambda: read_h36m(path, shared_data / "h36m"), path, None, match="cannot read npz")
  arrays = _npz(shared_data)
  arrays["imgname"] = np.arange(4.0)
  path = tmp_path / "numbers.npz"
  np.savez(path, **arrays)
  _refused(lambda: read_h36m(path, shared_data / "h36m"), path, "imgname")


# ------------------------------------------------------------------------------ MP-100


@pytest.fixture()
def mp100(shared_data, tmp_path):
  shutil.copy(shared_data / "coco/000000000785.jpg", tmp_path / "a.jpg")
  shutil.copy(shared_data / "coco/000000040083.jpg", tmp_path / "b.jpg")
  return {
      "images": [{"id": 7, "file_name": "a.jpg", "width": 640, "height": 425},
                 {"id": 8, "file_name": "b.jpg", "width": 640, "height": 427}],
      "categories": [
          {"id": 1, "name": "chair", "keypoints": ["left_leg", "right_leg", "seat"]},
          {"id": 2, "name": "bird_body", "keypoints": ["beak", "tail"]}],
      "annotations": [
          {"id": 1, "image_id": 7, "category_id": 1, "bbox": [10, 10, 100, 100],
           "keypoints": [20, 20, 2, 80, 20, 2, 50, 50, 2]},
          {"id": 2, "image_id": 8, "category_id": 2, "bbox": [200, 10, 50, 50],
           "keypoints": [210, 20, 2, 0, 0, 0]}],
  }


MP100_CASES = {
    "keypoint_nan": lambda d: _ann(0, "keypoints", 3, NAN)(d),
    "visibility_7": lambda d: _visibility(0, 7)(d),
    "bbox_inf": lambda d: _ann(1, "bbox", 3, INF)(d),
    "height_nan": lambda d: _image("height", NAN)(d),
    "duplicate_annotation_id": lambda d: _duplicate("annotations")(d),
    "duplicate_image_id": lambda d: _duplicate("images")(d),
    "duplicate_category_id": lambda d: _duplicate("categories")(d),
}


@pytest.mark.parametrize("case", sorted(MP100_CASES))
def test_mp100_refuses_bad_numbers_and_ids(mp100, tmp_path, case):
  data = copy.deepcopy(mp100)
  field, record = MP100_CASES[case](data)
  path = _write(tmp_path / "mp100.json", data)
  _refused(lambda: read_mp100(path, tmp_path), path, field, record)


# ------------------------------------------------------------------- AP-10K, captions


@pytest.mark.parametrize("mutate,field", [
    (lambda cats: cats.__setitem__(3, "antelope"), "categories[3]"),
    (lambda cats: cats[4].__setitem__("id", cats[3]["id"]), "categories[4].id"),
])
def test_ap10k_families_refuse_malformed_categories(shared_data, tmp_path, mutate, field):
  data = json.loads((shared_data / "ap10k/test_ap10k.json").read_text())
  mutate(data["categories"])
  path = _write(tmp_path / "ap10k.json", data)
  _refused(lambda: read_ap10k_families(path, shared_data / "ap10k", families="Bovidae"), path,
           field)


def test_caption_file_nested_too_deeply(shared_data, tmp_path):
  path = tmp_path / "chat.json"
  path.write_text("[" * 100_000 + "]" * 100_000)
  _refused(lambda: read_llava_captions(path, shared_data / "coco"), path, None,
           match="nested too deeply")
