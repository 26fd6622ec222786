"""Prepared TFDS data: the COCO and H36M samples written as ArrayRecord and read back
by random access through tfds.data_source, equal field for field."""

import dataclasses
import os
import pickle

import numpy as np
import pytest

from kptjax.data import transforms as T
from kptjax.data.sources import read_dataset
from kptjax.data.tfds_builder import PersonRecordSource, prepare_tfds
from kptjax.errors import DataError


def _assert_same(a, b):
  """Every PersonRecord field equal (arrays to f32 precision), image bytes aside."""
  for f in dataclasses.fields(a):
    if f.name == "image_bytes":
      continue
    x, y = getattr(a, f.name), getattr(b, f.name)
    if isinstance(x, dict):
      assert x.keys() == y.keys(), f.name
      for k in x:
        np.testing.assert_array_equal(x[k], y[k], err_msg=f"{f.name}.{k}")
    elif isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
      np.testing.assert_array_equal(x, y, err_msg=f.name)
    elif isinstance(x, float):
      assert x == pytest.approx(y, rel=1e-6), f.name
    else:
      assert x == y, f.name


@pytest.fixture(scope="module")
def prepared(shared_data, tmp_path_factory):
  coco = read_dataset("coco", shared_data / "coco/test_coco.json", shared_data / "coco")
  h36m = read_dataset("h36m", shared_data / "h36m/h36m_coco.json", shared_data / "h36m",
                      camera_file=shared_data / "h36m/cameras.from_pkl.json")
  mpii = read_dataset("mpii", shared_data / "mpii/test_mpii.json", shared_data / "mpii")
  out = tmp_path_factory.mktemp("tfds")
  path = prepare_tfds({"coco": coco, "h36m": h36m, "mpii": mpii}, out, "kptjax_samples")
  return out, path, {"coco": coco, "h36m": h36m, "mpii": mpii}


def test_written_as_array_record(prepared):
  _, path, records = prepared
  files = os.listdir(path)
  for split in records:
    assert any(f.startswith(f"kptjax_samples-{split}.array_record") for f in files), files


@pytest.mark.parametrize("split", ["coco", "h36m", "mpii"])
def test_read_back_equal_by_random_access(prepared, split):
  out, _, records = prepared
  source = PersonRecordSource(out, "kptjax_samples", split)
  assert len(source) == len(records[split])
  for i in reversed(range(len(source))):  # random access, any order
    back, orig = source[i], records[split][i]
    _assert_same(back, orig)
    with open(orig.image_path, "rb") as f:
      assert back.image_bytes == f.read()  # the file's bytes, not re-encoded
  np.testing.assert_array_equal(T.load_record_image(source[0]),
                                T.load_image(records[split][0].image_path))


def test_source_pickles_for_grain_workers(prepared):
  out, _, records = prepared
  source = pickle.loads(pickle.dumps(PersonRecordSource(out, "kptjax_samples", "coco")))
  assert source[5].ann_id == records["coco"][5].ann_id


def test_unreadable_image_while_preparing_is_a_data_error(prepared, tmp_path):
  _, _, records = prepared
  bad = dataclasses.replace(records["coco"][0], image_path=str(tmp_path / "absent.jpg"))
  with pytest.raises(DataError, match="absent.jpg"):
    prepare_tfds([bad], tmp_path, "never_written")
