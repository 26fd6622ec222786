"""COCO-format keypoint files -> PersonRecords (COCO, Human-Art, AP-10K, CrowdPose,
OCHuman, AIC, the synthetic set) and MP-100-style category-agnostic files.

Boxes: with ground truth, each box is sanitized as HRNet/LocLLM do (clipped to the
image, ``x2 = x1 + max(0, w - 1)``) and ``record.extra['bbox_raw']`` keeps the file's
box; with a detection file (``det_file``), one record per detection whose score
passes ``det_score_threshold``, keypoints all zero, ``score`` the detector's.

Bad input policy:
  * unreadable / malformed JSON, a missing or mistyped field, a keypoint list whose
    length is not 3 x K of the spec, an annotation or detection of an unknown image or
    of a category not in ``categories``, a duplicate image, annotation or category id,
    a number that is NaN / inf or out of its range (keypoint visibility not 0 / 1 / 2,
    image width or height not a whole number >= 1, detection score outside [0, 1];
    ``sources.fields``): ``DataError`` naming the file, the record and the field.
  * counted, logged skips (``records.skipped``):
      'crowd'             iscrowd annotations;
      'zero_area'         a box with w <= 0 or h <= 0 or area <= 0 (nothing to crop);
      'no_keypoints'      fewer than ``min_keypoints`` labeled (v > 0) keypoints.
                          The default 1 drops persons without any label for training
                          AND for evaluation with ground-truth boxes, as HRNet and
                          LocLLM do (COCOeval ignores such persons); pass 0 to keep them;
      'missing_image'     the image file does not exist (checked once per image at read
                          time; pass check_images=False to skip the check — a missing
                          file then raises DataError when it is loaded);
      'other_category'    not in ``category_ids``;
      'low_score'         a detection below ``det_score_threshold``.
  * a corrupt image is found only when decoded: ``transforms.load_image`` raises
    DataError naming the file.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from kptjax.data.sources.base import PersonRecord, Records
from kptjax.data.sources.fields import (
    ExistsCache,
    UniqueIds,
    annotation_ids,
    category_table,
    field,
    image_table,
    keypoint_rows,
    known_category,
    load_json,
    number,
    numbers,
)
from kptjax.data.sources.query_descriptions import describe
from kptjax.errors import DataError
from kptjax.keypoints import KeypointSpec, get_spec, register_spec, spec_from_dict


def sanitize_box(box: Sequence[float], width: int, height: int) -> Optional[np.ndarray]:
  """HRNet's box cleaning: f32[4] x, y, w, h clipped to the image, or None if empty."""
  x, y, w, h = (float(v) for v in box)
  x1, y1 = max(0.0, x), max(0.0, y)
  x2 = min(width - 1.0, x1 + max(0.0, w - 1.0))
  y2 = min(height - 1.0, y1 + max(0.0, h - 1.0))
  if w <= 0 or h <= 0 or x2 < x1 or y2 < y1:
    return None
  return np.array([x1, y1, x2 - x1, y2 - y1], np.float32)


def _image_table(data: Mapping[str, Any], path: str, image_root: str,
                 image_prefix_strip: str) -> dict[int, dict[str, Any]]:
  table = {}
  for image_id, (file_name, size) in image_table(data, path).items():
    if image_prefix_strip and file_name.startswith(image_prefix_strip):
      file_name = file_name[len(image_prefix_strip):]
    table[image_id] = {"path": os.path.join(os.fspath(image_root), file_name), "size": size}
  return table


def _add_ground_truth(records: Records, image: Mapping[str, Any], raw_box: Sequence[float],
                      keypoints: np.ndarray, *, area: Optional[float], min_keypoints: int,
                      exists: Optional[ExistsCache], **fields: Any) -> None:
  """Appends one ground-truth person to ``records``, or counts why it is skipped.

  Skips: 'zero_area' (the box is empty once sanitized, or ``area`` <= 0),
  'no_keypoints' (fewer than ``min_keypoints`` labeled), 'missing_image' (``exists``
  says the image file is missing; None: not checked). ``fields``: the PersonRecord's
  remaining fields (spec, image_id, ann_id, dataset, category).
  """
  box = sanitize_box(raw_box, *image["size"])
  if box is None or (area is not None and area <= 0):
    records.skipped["zero_area"] += 1
  elif int(np.sum(keypoints[:, 2] > 0)) < min_keypoints:
    records.skipped["no_keypoints"] += 1
  elif exists is not None and not exists(image["path"]):
    records.skipped["missing_image"] += 1
  else:
    records.append(PersonRecord(
        image_path=image["path"], image_size=image["size"], box=box, keypoints=keypoints,
        extra={"bbox_raw": np.asarray(raw_box, np.float32)}, **fields))


def read_coco_keypoints(ann_file: Union[str, os.PathLike], image_root: Union[str, os.PathLike], *,
                        spec: Union[str, KeypointSpec] = "coco17", dataset: str = "coco",
                        det_file: Union[str, os.PathLike, None] = None,
                        det_score_threshold: float = 0.0, image_prefix_strip: str = "",
                        min_keypoints: int = 1, category_ids: Optional[Iterable[int]] = None,
                        keypoints_field: str = "keypoints", check_images: bool = True) -> Records:
  """Reads person (or animal) keypoints from a COCO-format file.

  Args:
    ann_file: COCO keypoints JSON (``images``, ``annotations``, ``categories``).
    image_root: folder the ``file_name`` of each image is relative to.
    spec: KeypointSpec (or name) the keypoint lists follow; K = spec.num_keypoints.
    dataset: short name written into each record.
    det_file: optional detection results (list of {image_id, bbox xywh, score,
      category_id}); records then come from detections, not ground truth.
    det_score_threshold: detections with a lower score are skipped ('low_score').
    image_prefix_strip: prefix removed from ``file_name`` (Human-Art:
      'HumanArt/images/').
    min_keypoints: persons with fewer labeled keypoints are skipped ('no_keypoints');
      not applied to detections.
    category_ids: keep only these categories (default: all).
    keypoints_field: annotation key holding the keypoints (Human-Art: 'keypoints_21').
    check_images: skip records whose image file is missing ('missing_image').

  Returns:
    Records (a list of PersonRecord in original-image pixels) with ``.skipped``.
  """
  path = os.fspath(ann_file)
  spec = get_spec(spec)
  num = spec.num_keypoints
  data = load_json(path)
  if not isinstance(data, dict):
    raise DataError(path, "a COCO file must hold an object", expected="images, annotations")
  images = _image_table(data, path, image_root, image_prefix_strip)
  categories = {i: c.get("name") for i, c in category_table(data, path).items()}
  keep_cats = None if category_ids is None else set(category_ids)
  exists = ExistsCache()
  records = Records(source=path)

  if det_file is not None:
    det_path = os.fspath(det_file)
    dets = load_json(det_path)
    if not isinstance(dets, list):
      raise DataError(det_path, "a detection file must hold a list",
                      expected="[{image_id, bbox, score, category_id}, ...]")
    for i, det in enumerate(dets):
      where = f"[{i}]"
      image_id = field(det, "image_id", det_path, where, int)
      if image_id not in images:
        raise DataError(det_path, f"image_id {image_id} is not in {path}", field=f"{where}.image_id")
      box = numbers(det, "bbox", det_path, where, 4)
      score = number(det, "score", det_path, where, low=0.0, high=1.0)
      category = known_category(field(det, "category_id", det_path, where, int, default=1),
                                categories, det_path, f"{where}.category_id")
      if keep_cats is not None and category not in keep_cats:
        records.skipped["other_category"] += 1
        continue
      if score < det_score_threshold:
        records.skipped["low_score"] += 1
        continue
      if box[2] <= 0 or box[3] <= 0:
        records.skipped["zero_area"] += 1
        continue
      image = images[image_id]
      if check_images and not exists(image["path"]):
        records.skipped["missing_image"] += 1
        continue
      records.append(PersonRecord(
          image_path=image["path"], image_size=image["size"],
          box=np.asarray(box, np.float32), keypoints=np.zeros((num, 3), np.float32),
          spec=spec.name, image_id=image_id, ann_id=i, dataset=dataset, score=score,
          category=categories.get(category)))
    records.log_summary(f"read_coco_keypoints[{dataset}, detections {det_path}]")
    return records

  annotations = field(data, "annotations", path, "", list)
  ann_ids = UniqueIds("annotation id")
  for i, ann in enumerate(annotations):
    where = f"annotations[{i}]"
    ann_id, image_id = annotation_ids(ann, i, ann_ids, images, path, where)
    category = known_category(
        field(ann, "category_id", path, where, int, record=ann_id, default=1), categories,
        path, f"{where}.category_id", record=ann_id)
    if keep_cats is not None and category not in keep_cats:
      records.skipped["other_category"] += 1
      continue
    if field(ann, "iscrowd", path, where, (int, bool), record=ann_id, default=0):
      records.skipped["crowd"] += 1
      continue
    keypoints = keypoint_rows(ann, keypoints_field, path, where, num, record=ann_id)
    raw_box = numbers(ann, "bbox", path, where, 4, record=ann_id)
    area = number(ann, "area", path, where, record=ann_id, default=None)
    _add_ground_truth(records, images[image_id], raw_box, keypoints, area=area,
                      min_keypoints=min_keypoints, exists=exists if check_images else None,
                      spec=spec.name, image_id=image_id, ann_id=ann_id, dataset=dataset,
                      category=categories.get(category))
  records.log_summary(f"read_coco_keypoints[{dataset}]")
  return records


# ----------------------------------------------------------------------------- MP-100

GENERATED = "generated"   # read_mp100(descriptions=GENERATED): query_descriptions.describe
_SIDE = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def _pair_left_right(names: Sequence[str]) -> list[dict[str, Any]]:
  """Flip partners by name: 'left X' <-> 'right X' when both exist."""
  entries = [{"name": n} for n in names]
  lookup = {n.lower(): i for i, n in enumerate(names)}
  for i, n in enumerate(names):
    m = _SIDE.search(n)
    if m and m.group(1).lower() == "left":
      other = (n[:m.start()] + "right" + n[m.end():]).lower()
      if other in lookup:
        entries[i]["flip"] = names[lookup[other]]
  return entries


def _category_spec(cat: Mapping[str, Any], path: str, where: str,
                   descriptions: Optional[Mapping[str, Any]], prefix: str,
                   generate: bool = False) -> KeypointSpec:
  cat_name = str(field(cat, "name", path, where, str))
  names = [str(n).replace("_", " ") for n in field(cat, "keypoints", path, where, list)]
  texts = cat.get("keypoint_descriptions")
  if texts is None and descriptions is not None:
    texts = descriptions.get(cat_name)
  if isinstance(texts, Mapping):
    texts = [texts.get(n) or texts.get(n.replace(" ", "_")) for n in names]
  if texts is not None and (not isinstance(texts, list) or len(texts) != len(names)):
    raise DataError(path, "descriptions do not match the keypoints",
                    field=f"{where}.keypoint_descriptions", expected=f"{len(names)} texts")
  subject = cat_name.replace("_", " ")
  skeleton = []
  for k, pair in enumerate(cat.get("skeleton") or []):
    if (not isinstance(pair, (list, tuple)) or len(pair) != 2
        or not all(isinstance(v, int) and 1 <= v <= len(names) for v in pair)):
      raise DataError(path, f"bad limb {pair!r}", field=f"{where}.skeleton[{k}]",
                      expected=f"two 1-based keypoint indices <= {len(names)}")
    skeleton.append([pair[0] - 1, pair[1] - 1])
  generated = describe(cat_name, names, skeleton) if generate else None
  entries = _pair_left_right(names)
  for i, entry in enumerate(entries):
    text = texts[i] if texts is not None else None
    entry["description"] = text or (generated[i] if generated else
                                     f"The {names[i]} of the {subject}.")
  return spec_from_dict({"name": f"{prefix}{cat_name}", "subject": subject,
                         "description": f"MP-100 category {cat_name}",
                         "keypoints": entries, "skeleton": skeleton}, path)


def read_mp100(ann_file: Union[str, os.PathLike], image_root: Union[str, os.PathLike], *,
               descriptions: Union[str, os.PathLike, Mapping[str, Any], None] = None,
               dataset: str = "mp100", min_keypoints: int = 1, check_images: bool = True,
               spec_prefix: str = "mp100/") -> Records:
  """Reads an MP-100-style category-agnostic COCO file.

  Each category has its own keypoint list; this makes one KeypointSpec per category,
  named ``spec_prefix + category name`` (registered, and in ``records.specs``), with
  flip pairs found by 'left'/'right' in the names. Descriptions come from the
  category's ``keypoint_descriptions`` (list aligned with ``keypoints``), else from
  ``descriptions`` (a mapping or JSON file: category -> list or {name: text}; or
  ``'generated'``: kptjax's own detailed queries, ``query_descriptions.describe``), else
  a plain 'The <keypoint> of the <category>.' sentence.

  Same skips and errors as ``read_coco_keypoints``.
  """
  path = os.fspath(ann_file)
  data = load_json(path)
  if not isinstance(data, dict):
    raise DataError(path, "a COCO file must hold an object", expected="images, annotations")
  generate = isinstance(descriptions, str) and descriptions == GENERATED
  if generate:
    descriptions = None
  elif descriptions is not None and not isinstance(descriptions, Mapping):
    descriptions = load_json(descriptions)
  specs: dict[int, KeypointSpec] = {}
  for i, (cat_id, cat) in enumerate(category_table(data, path).items()):
    spec = _category_spec(cat, path, f"categories[{i}]", descriptions, spec_prefix, generate)
    specs[cat_id] = register_spec(spec, overwrite=True)
  images = _image_table(data, path, image_root, "")
  exists = ExistsCache()
  records = Records(source=path, specs={s.name: s for s in specs.values()})
  ann_ids = UniqueIds("annotation id")
  for i, ann in enumerate(field(data, "annotations", path, "", list)):
    where = f"annotations[{i}]"
    ann_id, image_id = annotation_ids(ann, i, ann_ids, images, path, where)
    category = known_category(field(ann, "category_id", path, where, int, record=ann_id),
                              specs, path, f"{where}.category_id", record=ann_id)
    spec = specs[category]
    if field(ann, "iscrowd", path, where, (int, bool), record=ann_id, default=0):
      records.skipped["crowd"] += 1
      continue
    keypoints = keypoint_rows(ann, "keypoints", path, where, spec.num_keypoints, record=ann_id)
    raw_box = numbers(ann, "bbox", path, where, 4, record=ann_id)
    _add_ground_truth(records, images[image_id], raw_box, keypoints, area=None,
                      min_keypoints=min_keypoints, exists=exists if check_images else None,
                      spec=spec.name, image_id=image_id, ann_id=ann_id, dataset=dataset,
                      category=spec.subject)
  records.log_summary("read_mp100")
  return records
