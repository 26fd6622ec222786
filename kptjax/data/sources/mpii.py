"""MPII Human Pose in the common JSON conversion (HRNet / mmpose) -> PersonRecords.

Each entry is ``{image, center[2], scale, joints[16][2], joints_vis[16]}`` with
1-based (MATLAB) pixel coordinates and ``scale`` = person height / 200 px. As in
HRNet, the center moves down by 15 * scale px and everything is shifted to 0-based
pixels (joints, center and head boxes - 1). The record's box is the square of side
200 * scale px about that center; crop it with padding 1.25 (LocLLM) to get HRNet's
``scale * 1.25``. Labeled joints get visibility 2 (MPII has no occlusion flag).
``record.extra['index']`` is the entry's position in the file, which is also its
column in ``mpii_gt_val.mat`` (``pos_gt_src``, ``jnt_missing``) for PCKh.

Head boxes: pass ``headbox_file`` (``mpii_gt_val.mat``, read with scipy.io.loadmat):
``headboxes_src`` float[2, 2, N] (top-left and bottom-right corner per person) must
have N = number of entries in the JSON; ``record.head_box`` = x1, y1, x2, y2 (0-based).

Bad input: malformed JSON / .mat (a head-box file that is not a MATLAB file), missing or
mistyped fields, a number that is NaN / inf or not a number (joints, center, scale, head
boxes), visibility not 0 / 1 / 2, N mismatch -> DataError naming the file, the entry and
the field. Counted skips: 'zero_area' (scale <= 0), 'no_keypoints' (fewer
than ``min_keypoints`` labeled joints), 'missing_image' (image sizes are read from the
image headers, so a missing image is always skipped).
"""

from __future__ import annotations

import os
from typing import Optional, Union

import numpy as np

from kptjax.data.sources.base import PersonRecord, Records
from kptjax.data.sources.fields import (
    VISIBILITY,
    checked_array,
    field,
    image_size,
    load_json,
    number,
    numbers,
)
from kptjax.errors import DataError
from kptjax.keypoints import KeypointSpec, get_spec


def read_mpii_headboxes(headbox_file: Union[str, os.PathLike], count: Optional[int] = None
                        ) -> np.ndarray:
  """f32[N, 4] head boxes x1, y1, x2, y2 (1-based, as stored) from ``mpii_gt_val.mat``."""
  # Lazy: scipy.io (seconds to import) is only needed for MPII's .mat files.
  import scipy.io  # pylint: disable=g-import-not-at-top

  path = os.fspath(headbox_file)
  try:
    mat = scipy.io.loadmat(path)
  except FileNotFoundError as e:
    raise DataError(path, "file not found") from e
  except Exception as e:  # pylint: disable=broad-except
    # scipy's parsers fail on a non-MATLAB file in many ways (ValueError, IndexError,
    # MatReadError, struct.error, ...): all of them mean the same thing here.
    raise DataError(path, f"cannot read MATLAB file: {type(e).__name__}: {e}",
                    expected="mpii_gt_val.mat") from e
  boxes = mat.get("headboxes_src")
  if boxes is None:
    raise DataError(path, "missing field", field="headboxes_src")
  boxes = checked_array(boxes, path, "headboxes_src").astype(np.float32)
  if boxes.ndim != 3 or boxes.shape[:2] != (2, 2) or (count is not None and boxes.shape[2] != count):
    raise DataError(path, f"headboxes_src has shape {boxes.shape}", field="headboxes_src",
                    expected=f"(2, 2, {count if count is not None else 'N'})")
  return np.concatenate([boxes[0].T, boxes[1].T], axis=1)


def read_mpii_json(json_file: Union[str, os.PathLike], image_root: Union[str, os.PathLike], *,
                   headbox_file: Union[str, os.PathLike, None] = None,
                   spec: Union[str, KeypointSpec] = "mpii16", dataset: str = "mpii",
                   min_keypoints: int = 1) -> Records:
  """Reads the MPII JSON conversion (see the module docstring for conventions).

  Args:
    json_file: JSON list of {image, center, scale, joints, joints_vis}.
    image_root: folder of the images.
    headbox_file: optional ``mpii_gt_val.mat`` with the head boxes for PCKh.
    spec: the 16-joint spec.
    dataset: short name written into each record.
    min_keypoints: entries with fewer labeled joints are skipped (use 0 for PCKh
      evaluation so that every entry of the .mat has its record).

  Returns:
    Records of PersonRecord (0-based original-image pixels) with ``.skipped``.
  """
  path = os.fspath(json_file)
  spec = get_spec(spec)
  num = spec.num_keypoints
  entries = load_json(path)
  if not isinstance(entries, list):
    raise DataError(path, "an MPII file must hold a list",
                    expected="[{image, center, scale, joints, joints_vis}, ...]")
  heads = None if headbox_file is None else read_mpii_headboxes(headbox_file, len(entries)) - 1.0
  sizes: dict[str, Optional[tuple[int, int]]] = {}
  records = Records(source=path)
  for i, entry in enumerate(entries):
    where = f"[{i}]"
    image = field(entry, "image", path, where, str, record=i)
    center = np.asarray(numbers(entry, "center", path, where, 2, record=i), np.float32)
    scale = number(entry, "scale", path, where, record=i)
    joints = field(entry, "joints", path, where, list, record=i)
    vis = np.asarray(numbers(entry, "joints_vis", path, where, num, record=i,
                             allowed=VISIBILITY), np.float32)
    if len(joints) != num or not all(isinstance(j, list) and len(j) == 2 for j in joints):
      raise DataError(path, "bad joints", field=f"{where}.joints", record=i,
                      expected=f"{num} [x, y] pairs")
    joints = checked_array(joints, path, f"{where}.joints", record=i)
    if scale <= 0:
      records.skipped["zero_area"] += 1
      continue
    keypoints = np.zeros((num, 3), np.float32)
    keypoints[:, :2] = np.asarray(joints, np.float32) - 1.0
    keypoints[:, 2] = np.where(vis > 0, 2.0, 0.0)
    if int(np.sum(vis > 0)) < min_keypoints:
      records.skipped["no_keypoints"] += 1
      continue
    image_path = os.path.join(os.fspath(image_root), image)
    if image_path not in sizes:
      sizes[image_path] = image_size(image_path)
    if sizes[image_path] is None:
      records.skipped["missing_image"] += 1
      continue
    if center[0] != -1:
      center[1] += 15.0 * scale
    center -= 1.0
    side = 200.0 * scale
    box = np.array([center[0] - side / 2, center[1] - side / 2, side, side], np.float32)
    stem = os.path.splitext(os.path.basename(image))[0]
    records.append(PersonRecord(
        image_path=image_path, image_size=sizes[image_path], box=box, keypoints=keypoints,
        spec=spec.name, image_id=int(stem) if stem.isdigit() else i, ann_id=i,
        dataset=dataset, center=center, scale=scale,
        head_box=None if heads is None else heads[i].astype(np.float32),
        extra={"index": i}))
  records.log_summary("read_mpii_json")
  return records
