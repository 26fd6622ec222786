"""Human3.6M -> PersonRecords with 2D keypoints, 3D joints in camera millimetres, camera.

Two annotation forms:
  * COCO-style JSON (``h36m_coco.json``): images + annotations with ``keypoints``
    (2D, pixels) and ``keypoints_3d`` (x, y, z, v in WORLD coordinates, metres).
    The camera file turns them into camera coordinates:
    ``X_cam = R^T (X_world - T)`` (R, T as stored in mmpose's ``cameras.pkl``:
    camera-to-world rotation and the camera position). Without a camera file the
    records have no ``keypoints_3d``.
  * npz (mmpose ``body3d``): ``imgname``, ``center[N,2]``, ``scale[N]`` (box side / 200
    px), ``part[N,K,3]`` (2D + vis), ``S[N,K,4]`` (3D in CAMERA coordinates, metres).

Records: ``keypoints`` f32[K, 3] (2D pixels, labeled joints v = 2), ``keypoints_3d``
f32[K, 4] (x, y, z millimetres in camera coordinates, v), ``camera`` {R f32[3,3],
T f32[3] (mm), f f32[2], c f32[2] (px), k f32[3], p f32[2], subject, camera_id}
when a camera file is given (JSON keyed 'S1|54138969', as
``shared/data/h36m/cameras.from_pkl.json``; the pickle itself is never loaded).

Image files: the JSON's bare ``file_name`` is looked up in ``image_root`` and then in
``image_root/S1/S1_Directions_1.54138969/`` (the layout of the frames on disk).

Bad input: malformed JSON / npz (a truncated npz too), missing fields, wrong shapes, a
number that is NaN / inf or not a number (keypoints, 3D joints, boxes, centers, scales,
camera parameters; focal lengths must be > 0), visibility not 0 / 1 / 2, duplicate
image or annotation ids, a camera missing from the camera file -> DataError naming the
file, the record and the field. Counted skips:
'missing_image', 'no_keypoints', 'zero_area'.

Protocol filters (LocLLM Table 5 follows the standard protocol: train on subjects
S1, S5, S6, S7, S8, test on S9, S11; frames subsampled, every 5th for training and
every 64th for testing in the common protocol of RLE / Integral regression):
``subjects='S1|S5|S6|S7|S8'`` keeps those subjects, ``frame_stride=5`` keeps frames
whose 0-based index (the file's 1-based frame number - 1) is a multiple of 5. Both
read the subject and frame from the file name (``FRAME_NAME``); a name that does not
match is a DataError when a filter is set. Persons removed are counted
('other_subject', 'between_strides').
"""

from __future__ import annotations

import dataclasses
import os
import re
import zipfile
from typing import Any, Optional, Sequence, Union

import numpy as np

from kptjax.data.sources.base import PersonRecord, Records
from kptjax.data.sources.fields import (
    VISIBILITY,
    ExistsCache,
    UniqueIds,
    annotation_ids,
    checked_array,
    field,
    image_size,
    image_table,
    keypoint_rows,
    load_json,
    numbers,
)
from kptjax.errors import ConfigError, DataError
from kptjax.keypoints import KeypointSpec, get_spec

# 'S1_Directions_1.54138969_000001.jpg' -> subject, sequence folder, camera id.
FRAME_NAME = re.compile(r"^(?P<subject>S\d+)_(?P<action>.+)\.(?P<camera>\d+)_(?P<frame>\d+)\.\w+$")
_ACTION_WORD = re.compile(r"[A-Za-z]+")
METRES_TO_MM = 1000.0


def load_cameras(camera_file: Union[str, os.PathLike]) -> dict[str, dict[str, Any]]:
  """'subject|camera_id' -> camera dict (R, T in mm, f, c, k, p) from the JSON form."""
  path = os.fspath(camera_file)
  data = load_json(path)
  cams = data.get("cameras", data) if isinstance(data, dict) else None
  if not isinstance(cams, dict):
    raise DataError(path, "a camera file must map 'subject|camera_id' to cameras",
                    field="cameras")
  out = {}
  for key, cam in cams.items():
    where = f"cameras.{key}"
    def arr(name, shape, low=None):
      value = checked_array(field(cam, name, path, where), path, f"{where}.{name}", low=low)
      if value.size != int(np.prod(shape)):
        raise DataError(path, f"bad camera parameter of shape {value.shape}",
                        field=f"{where}.{name}", expected=f"shape {shape}")
      return value.reshape(shape)
    subject, _, camera_id = str(key).partition("|")
    out[str(key)] = {
        "R": arr("R", (3, 3)).astype(np.float32),
        "T": (arr("T", (3,)) * METRES_TO_MM).astype(np.float32),
        "f": arr("f", (2,), low=1e-6).astype(np.float32), "c": arr("c", (2,)).astype(np.float32),
        "k": arr("k", (3,)).astype(np.float32), "p": arr("p", (2,)).astype(np.float32),
        "subject": subject, "camera_id": camera_id,
    }
  return out


def world_to_camera(points_mm: np.ndarray, camera: dict[str, Any]) -> np.ndarray:
  """f32[..., 3] world millimetres -> camera millimetres: R^T (X - T)."""
  r = np.asarray(camera["R"], np.float64)
  return ((np.asarray(points_mm, np.float64) - camera["T"]) @ r).astype(np.float32)


def project(points_cam_mm: np.ndarray, camera: dict[str, Any]) -> np.ndarray:
  """Pinhole projection (no distortion) of camera-frame points to pixels, f32[..., 2]."""
  p = np.asarray(points_cam_mm, np.float64)
  return (p[..., :2] / p[..., 2:3] * camera["f"] + camera["c"]).astype(np.float32)


def frame_action(image_path: str) -> str:
  """The action of an H36M frame file: 'S1_Directions_1.54138969_000001.jpg' -> 'Directions'
  (the sequence name without its take number); 'unknown' for other names."""
  m = FRAME_NAME.match(os.path.basename(image_path))
  word = _ACTION_WORD.match(m["action"]) if m else None
  return word.group(0) if word else "unknown"


def parse_subjects(subjects: Union[str, Sequence[str], None]) -> frozenset[str]:
  """'S1|S5' (or 'S1 S5', a list) -> {'S1', 'S5'}; empty: no subject filter."""
  if subjects is None:
    return frozenset()
  if isinstance(subjects, str):
    subjects = re.split(r"[|\s]+", subjects)
  return frozenset(s.strip() for s in subjects if s and s.strip())


@dataclasses.dataclass(frozen=True)
class FrameFilter:
  """H36M protocol filter (module docstring): the subjects kept and the frame stride."""
  subjects: frozenset[str] = frozenset()
  frame_stride: int = 1

  def __post_init__(self):
    if int(self.frame_stride) < 1:
      raise ConfigError(f"h36m frame_stride={self.frame_stride}: need >= 1")

  @property
  def active(self) -> bool:
    return bool(self.subjects) or self.frame_stride > 1

  def skip_reason(self, name: str, path: str, where: str) -> Optional[str]:
    """None to keep the frame ``name``, else the counted skip's name."""
    if not self.active:
      return None
    m = FRAME_NAME.match(os.path.basename(name))
    if m is None:
      raise DataError(path, f"file name {name!r} names no subject / frame "
                      "(needed by the subjects / frame_stride filter)", field=where,
                      expected="'S1_Directions_1.54138969_000001.jpg'")
    if self.subjects and m["subject"] not in self.subjects:
      return "other_subject"
    if (int(m["frame"]) - 1) % self.frame_stride:
      return "between_strides"
    return None


def _camera_for(name: str, cameras: Optional[dict[str, Any]], path: str, where: str):
  m = FRAME_NAME.match(os.path.basename(name))
  if m is None:
    return None, None
  if cameras is None:
    return m, None
  key = f"{m['subject']}|{m['camera']}"
  if key not in cameras:
    raise DataError(path, f"camera {key!r} is not in the camera file", field=where)
  return m, cameras[key]


def _find_image(image_root: str, name: str, match, exists: ExistsCache) -> Optional[str]:
  candidates = [os.path.join(image_root, name)]
  if match is not None:
    folder = f"{match['subject']}_{match['action']}.{match['camera']}"
    candidates.append(os.path.join(image_root, match["subject"], folder, os.path.basename(name)))
  for c in candidates:
    if exists(c):
      return c
  return None


def read_h36m(ann_file: Union[str, os.PathLike], image_root: Union[str, os.PathLike], *,
              camera_file: Union[str, os.PathLike, None] = None,
              spec: Union[str, KeypointSpec] = "h36m17", dataset: str = "h36m",
              min_keypoints: int = 1, subjects: str = "", frame_stride: int = 1) -> Records:
  """Reads Human3.6M from the COCO-style JSON or the npz form (module docstring).

  Args:
    ann_file: ``*.json`` (COCO-style with keypoints_3d) or ``*.npz``.
    image_root: folder of the frames.
    camera_file: JSON cameras keyed 'subject|camera_id' (needed for 3D from the JSON).
    spec: the 17-joint spec (root first).
    dataset: short name written into each record.
    min_keypoints: skip persons with fewer labeled 2D joints.
    subjects: keep only these subjects ('S1|S5|S6|S7|S8'; empty: all).
    frame_stride: keep every ``frame_stride``-th frame (1: all).
  """
  path = os.fspath(ann_file)
  spec = get_spec(spec)
  cameras = None if camera_file is None else load_cameras(camera_file)
  keep = FrameFilter(parse_subjects(subjects), int(frame_stride))
  read = _read_npz if path.endswith(".npz") else _read_json
  return read(path, os.fspath(image_root), spec, cameras, dataset, min_keypoints, keep)


def _read_json(path, image_root, spec, cameras, dataset, min_keypoints, keep) -> Records:
  num = spec.num_keypoints
  data = load_json(path)
  if not isinstance(data, dict):
    raise DataError(path, "a COCO file must hold an object", expected="images, annotations")
  images = image_table(data, path)
  exists = ExistsCache()
  records = Records(source=path)
  ann_ids = UniqueIds("annotation id")
  for i, ann in enumerate(field(data, "annotations", path, "", list)):
    where = f"annotations[{i}]"
    ann_id, image_id = annotation_ids(ann, i, ann_ids, images, path, where)
    name, size = images[image_id]
    skip = keep.skip_reason(name, path, f"images[{image_id}].file_name")
    if skip:
      records.skipped[skip] += 1
      continue
    kpts = keypoint_rows(ann, "keypoints", path, where, num, record=ann_id)
    kpts[:, 2] = np.where(kpts[:, 2] > 0, 2.0, 0.0)
    box = np.asarray(numbers(ann, "bbox", path, where, 4, record=ann_id), np.float32)
    if box[2] <= 0 or box[3] <= 0:
      records.skipped["zero_area"] += 1
      continue
    if int(np.sum(kpts[:, 2] > 0)) < min_keypoints:
      records.skipped["no_keypoints"] += 1
      continue
    match, camera = _camera_for(name, cameras, path, f"images[{image_id}].file_name")
    image_path = _find_image(image_root, name, match, exists)
    if image_path is None:
      records.skipped["missing_image"] += 1
      continue
    kpts3d = None
    if camera is not None and "keypoints_3d" in ann:
      world = keypoint_rows(ann, "keypoints_3d", path, where, num, 4,
                            record=ann_id).astype(np.float64)
      kpts3d = np.zeros((num, 4), np.float32)
      kpts3d[:, :3] = world_to_camera(world[:, :3] * METRES_TO_MM, camera)
      kpts3d[:, 3] = world[:, 3]
    records.append(PersonRecord(
        image_path=image_path, image_size=size, box=box, keypoints=kpts, spec=spec.name,
        image_id=image_id, ann_id=ann_id, dataset=dataset, camera=camera,
        keypoints_3d=kpts3d))
  records.log_summary("read_h36m[json]")
  return records


def _read_npz(path, image_root, spec, cameras, dataset, min_keypoints, keep) -> Records:
  num = spec.num_keypoints
  try:
    with np.load(path, allow_pickle=False) as data:
      arrays = {k: data[k] for k in data.files}
  except FileNotFoundError as e:
    raise DataError(path, "file not found") from e
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise DataError(path, f"cannot read npz: {type(e).__name__}: {e}",
                    expected="an uncompressed or zipped .npz") from e
  for key in ("imgname", "center", "scale", "part"):
    if key not in arrays:
      raise DataError(path, "missing array", field=key)
  if arrays["imgname"].dtype.kind not in "US" or arrays["imgname"].ndim != 1:
    raise DataError(path, f"array of {arrays['imgname'].dtype}, shape "
                    f"{arrays['imgname'].shape}", field="imgname", expected="file names [N]")
  n = len(arrays["imgname"])
  shapes = {"center": (n, 2), "scale": (n,), "part": (n, num, 3), "S": (n, num, 4)}
  for key, shape in shapes.items():
    if key in arrays:
      if arrays[key].shape != shape:
        raise DataError(path, f"shape {arrays[key].shape}", field=key, expected=str(shape))
      values = checked_array(arrays[key], path, key, rows_are_records=True)
      if key in ("part", "S"):
        checked_array(values[..., -1], path, f"{key}[visibility]", allowed=VISIBILITY,
                      rows_are_records=True)
      arrays[key] = values
  exists = ExistsCache()
  records = Records(source=path)
  for i in range(n):
    name = str(arrays["imgname"][i])
    skip = keep.skip_reason(name, path, f"imgname[{i}]")
    if skip:
      records.skipped[skip] += 1
      continue
    kpts = arrays["part"][i].astype(np.float32)
    kpts[:, 2] = np.where(kpts[:, 2] > 0, 2.0, 0.0)
    center = arrays["center"][i].astype(np.float32)
    scale = float(arrays["scale"][i])
    if scale <= 0:
      records.skipped["zero_area"] += 1
      continue
    if int(np.sum(kpts[:, 2] > 0)) < min_keypoints:
      records.skipped["no_keypoints"] += 1
      continue
    match, camera = _camera_for(name, cameras, path, f"imgname[{i}]")
    image_path = _find_image(image_root, name, match, exists)
    if image_path is None:
      records.skipped["missing_image"] += 1
      continue
    side = 200.0 * scale
    box = np.array([center[0] - side / 2, center[1] - side / 2, side, side], np.float32)
    kpts3d = None
    if "S" in arrays:
      kpts3d = arrays["S"][i].astype(np.float32)
      kpts3d[:, :3] *= METRES_TO_MM
    records.append(PersonRecord(
        image_path=image_path, image_size=image_size(image_path), box=box, keypoints=kpts,
        spec=spec.name, image_id=i, ann_id=i, dataset=dataset, center=center, scale=scale,
        camera=camera, keypoints_3d=kpts3d, extra={"imgname": name}))
  records.log_summary("read_h36m[npz]")
  return records
