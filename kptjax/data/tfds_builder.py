"""Prepared datasets: PersonRecords (+ their encoded images) as a TFDS dataset in
ArrayRecord files, which Grain reads by random access (``tfds.data_source``) on a
cluster without the original image folders.

    records = read_dataset('coco', ann_file, image_root)
    prepare_tfds(records, '/data/tfds', 'coco_person_val')      # once
    source = PersonRecordSource('/data/tfds', 'coco_person_val')  # anywhere
    source[i]  # -> PersonRecord with image_bytes, equal to records[i]

Each example stores the image file's bytes unchanged (no re-encode: decoding it
gives the same pixels as the original file) and every PersonRecord field; absent
optional fields are stored as NaN (center, scale, head_box), an empty [0, 4] array
(keypoints_3d) or '' (category, camera). ``camera`` and ``extra`` are JSON text.
Example order is the record order (write-time shuffling is disabled), so index i
is record i; training shuffles in Grain.

Bad input: an image file that cannot be read while preparing -> DataError naming it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence, Union

import numpy as np

from kptjax.data.sources.base import PersonRecord
from kptjax.errors import DataError

# tensorflow_datasets (and TensorFlow under it) is imported inside the functions that use
# it: it is heavy and only needed to prepare or read these files.
FILE_FORMAT = "array_record"
VERSION = "1.0.0"


def _features():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  f = tfds.features
  return f.FeaturesDict({
      "image_bytes": f.Tensor(shape=(), dtype=np.object_),
      "image_path": f.Text(),
      "image_size": f.Tensor(shape=(2,), dtype=np.int32),
      "box": f.Tensor(shape=(4,), dtype=np.float32),
      "keypoints": f.Tensor(shape=(None, 3), dtype=np.float32),
      "keypoints_3d": f.Tensor(shape=(None, 4), dtype=np.float32),
      "spec": f.Text(),
      "image_id": f.Scalar(dtype=np.int64),
      "ann_id": f.Scalar(dtype=np.int64),
      "dataset": f.Text(),
      "score": f.Scalar(dtype=np.float32),
      "center": f.Tensor(shape=(2,), dtype=np.float32),
      "scale": f.Scalar(dtype=np.float32),
      "head_box": f.Tensor(shape=(4,), dtype=np.float32),
      "category": f.Text(),
      "camera": f.Text(),
      "extra": f.Text(),
  })


def _jsonable(value: Any) -> Any:
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, (np.generic,)):
    return value.item()
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  return value


def record_to_example(record: PersonRecord) -> dict[str, Any]:
  """A PersonRecord -> a TFDS example dict (reads the image file unless bytes are set)."""
  data = record.image_bytes
  if data is None:
    try:
      with open(record.image_path, "rb") as f:
        data = f.read()
    except OSError as e:
      raise DataError(record.image_path, f"cannot read image: {e.strerror or e}", field="image",
                      record=record.ann_id) from e
  nan2, nan4 = np.full(2, np.nan, np.float32), np.full(4, np.nan, np.float32)
  camera = "" if record.camera is None else json.dumps(_jsonable(record.camera))
  return {
      "image_bytes": bytes(data),
      "image_path": record.image_path,
      "image_size": np.asarray(record.image_size, np.int32),
      "box": np.asarray(record.box, np.float32),
      "keypoints": np.asarray(record.keypoints, np.float32),
      "keypoints_3d": (np.zeros((0, 4), np.float32) if record.keypoints_3d is None
                       else np.asarray(record.keypoints_3d, np.float32)),
      "spec": record.spec,
      "image_id": int(record.image_id),
      "ann_id": int(record.ann_id),
      "dataset": record.dataset,
      "score": float(record.score),
      "center": nan2 if record.center is None else np.asarray(record.center, np.float32),
      "scale": np.nan if record.scale is None else float(record.scale),
      "head_box": nan4 if record.head_box is None else np.asarray(record.head_box, np.float32),
      "category": record.category or "",
      "camera": camera,
      "extra": json.dumps(_jsonable(record.extra)),
  }


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def example_to_record(example: Mapping[str, Any]) -> PersonRecord:
  """A decoded example (numpy values, as ``tfds.data_source`` returns) -> PersonRecord."""
  center = np.asarray(example["center"], np.float32)
  head_box = np.asarray(example["head_box"], np.float32)
  scale = float(example["scale"])
  kpts3d = np.asarray(example["keypoints_3d"], np.float32)
  camera = _text(example["camera"])
  if camera:
    camera = {k: np.asarray(v, np.float32) if isinstance(v, list) else v
              for k, v in json.loads(camera).items()}
  extra = {k: np.asarray(v, np.float32) if isinstance(v, list) else v
           for k, v in json.loads(_text(example["extra"])).items()}
  return PersonRecord(
      image_path=_text(example["image_path"]),
      image_size=tuple(int(v) for v in example["image_size"]),
      box=np.asarray(example["box"], np.float32),
      keypoints=np.asarray(example["keypoints"], np.float32),
      spec=_text(example["spec"]),
      image_id=int(example["image_id"]),
      ann_id=int(example["ann_id"]),
      dataset=_text(example["dataset"]),
      score=float(example["score"]),
      center=None if np.isnan(center).all() else center,
      scale=None if np.isnan(scale) else scale,
      head_box=None if np.isnan(head_box).all() else head_box,
      camera=camera or None,
      keypoints_3d=kpts3d if kpts3d.shape[0] else None,
      category=_text(example["category"]) or None,
      image_bytes=bytes(example["image_bytes"]),
      extra=extra)


def prepare_tfds(records: Union[Sequence[PersonRecord], Mapping[str, Sequence[PersonRecord]]],
                 out_dir: Union[str, os.PathLike], name: str, *, version: str = VERSION,
                 description: str = "kptjax PersonRecords") -> str:
  """Writes records (one split 'train', or {split: records}) as ArrayRecord TFDS data.

  Args:
    records: PersonRecords, or a mapping split name -> PersonRecords.
    out_dir: the TFDS data_dir.
    name: dataset name (lowercase letters, digits, '_').
    version: dataset version.
    description: stored in dataset_info.json.

  Returns:
    The dataset directory (``out_dir/name/version``).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  splits = dict(records) if isinstance(records, Mapping) else {"train": records}
  split_datasets = {
      split: [(i, record_to_example(r)) for i, r in enumerate(items)]
      for split, items in splits.items()}
  builder = tfds.dataset_builders.store_as_tfds_dataset(
      name=name, version=version, features=_features(), split_datasets=split_datasets,
      data_dir=os.fspath(out_dir), description=description, file_format=FILE_FORMAT,
      disable_shuffling=True)
  return os.fspath(builder.data_dir)


class PersonRecordSource:
  """Random access to a prepared dataset: ``len(src)``, ``src[i]`` -> PersonRecord.

  A Grain ``RandomAccessDataSource`` (picklable for worker processes: the TFDS
  data source is opened lazily in each process).
  """

  def __init__(self, data_dir: Union[str, os.PathLike], name: str, split: str = "train"):
    self.data_dir, self.name, self.split = os.fspath(data_dir), name, split
    self._source = None
    self._len = len(self._open())

  def _open(self):
    if self._source is None:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      self._source = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir)
    return self._source

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> PersonRecord:
    return example_to_record(self._open()[int(index)])

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_source"] = None
    return state

  def __repr__(self) -> str:
    return f"PersonRecordSource({self.data_dir!r}, {self.name!r}, split={self.split!r}, n={self._len})"
