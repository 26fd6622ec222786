"""The path layer (kptjax.storage) on a local disk and on a fake gs:// bucket.

The bucket is fsspec's in-memory filesystem registered for ``gs://`` (etils.epath's
fsspec backend, TensorFlow's gfile switched off), so what a run writes to a
``gs://`` workdir is checked offline: the workdir files kptjax writes itself
(``model_config.json`` and its resume check, ``metrics.jsonl``, ``adapter.safetensors``,
predictions JSON) round-trip through the bucket exactly, nothing lands in a local folder
named ``gs:``, and an interrupted write leaves neither a half file nor its temporary.
Checkpoints (Orbax -> tensorstore's own GCS driver) and TensorBoard events (TensorFlow's
gfile) use their own bucket clients and are not covered by the fake (README, "Run on a
cluster").
"""

import importlib
import json

import numpy as np
import pytest
from etils.epath import backend as epath_backend, gpath
from fsspec.implementations.memory import MemoryFileSystem

from configs import tiny
from kptjax import convert, storage
from kptjax.convert import export
from kptjax.errors import ConfigError
from kptjax.training import metrics_writer, preflight, trainer as trainer_lib


class FakeBucket(MemoryFileSystem):
  """An in-memory object store answering to gs://."""
  protocol = ("gs", "gcs")
  store: dict = {}
  pseudo_dirs = [""]

  @classmethod
  def _strip_protocol(cls, path):
    path = str(path)
    for prefix in ("gs://", "gcs://"):
      path = path.removeprefix(prefix)
    return super()._strip_protocol(path)


@pytest.fixture
def bucket(monkeypatch, tmp_path):
  monkeypatch.setenv("EPATH_USE_TF", "false")   # epath's gs:// backend: fsspec, not gfile
  monkeypatch.chdir(tmp_path)                    # a stray local 'gs:' folder would land here
  gpath._is_tf_installed.cache_clear()
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  registry = importlib.import_module("fsspec.registry")._registry   # restored after the test
  monkeypatch.setitem(registry, "gcs", FakeBucket)
  monkeypatch.setitem(registry, "gs", FakeBucket)
  FakeBucket.store.clear()
  FakeBucket.pseudo_dirs[:] = [""]
  yield "gs://bucket/run"
  monkeypatch.undo()
  gpath._is_tf_installed.cache_clear()
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  assert not (tmp_path / "gs:").exists()


def _objects():
  return sorted(FakeBucket.store)


def test_workdir_files_round_trip_through_the_bucket(bucket):
  model = tiny.get_config().model
  preflight.write_model_config(bucket, model)
  assert preflight.check_workdir_model(bucket, model) == []
  wider = tiny.get_config().model
  with wider.unlocked():
    wider.llm.hidden_size = 64
  with pytest.raises(ConfigError, match="hidden_size"):
    preflight.check_workdir_model(bucket, wider)

  rows = [{"step": 1, "loss": 6.25}, {"step": 2, "loss": 0.1 + 0.2}]
  for row in rows:
    storage.append_text(f"{bucket}/metrics.jsonl", json.dumps(row) + "\n")
  assert metrics_writer.read_metrics(bucket) == rows

  params = {"projector": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)},
            "llm": {"q": {"kernel": np.ones((3, 3), np.float32),
                          "lora_a": np.full((3, 2), 0.5, np.float32)}}}
  mask = {"projector": {"kernel": True}, "llm": {"q": {"kernel": False, "lora_a": True}}}
  trainer_lib.write_adapter(params, mask, f"{bucket}/adapter.safetensors")
  adapter, meta = convert.load_params(f"{bucket}/adapter.safetensors")
  assert meta["format"] == export.ADAPTER_FORMAT
  assert convert.flatten(adapter).keys() == {"projector/kernel", "llm/q/lora_a"}
  np.testing.assert_array_equal(adapter["projector"]["kernel"], params["projector"]["kernel"])
  np.testing.assert_array_equal(adapter["llm"]["q"]["lora_a"], params["llm"]["q"]["lora_a"])

  preds = [{"image_id": 1, "keypoints": [0.1, 0.7, 1.0], "score": 0.9}]
  storage.write_json_atomic(f"{bucket}/eval/predictions.json", preds)
  assert json.loads(storage.path(f"{bucket}/eval/predictions.json").read_text()) == preds
  assert _objects() == ["/bucket/run/adapter.safetensors", "/bucket/run/eval/predictions.json",
                        "/bucket/run/metrics.jsonl", "/bucket/run/model_config.json"]


@pytest.mark.parametrize("where", ["bucket", "local"])
def test_interrupted_write_leaves_the_old_file_and_no_temporary(where, bucket, tmp_path):
  root = bucket if where == "bucket" else str(tmp_path / "run")
  target = f"{root}/adapter.safetensors"
  storage.write_atomic(target, b"old")
  with pytest.raises(RuntimeError, match="disk died"):
    with storage.open_atomic(target) as f:
      f.write(b"half of the new")
      raise RuntimeError("disk died")
  assert storage.path(target).read_bytes() == b"old"
  assert [p.name for p in storage.path(root).iterdir()] == ["adapter.safetensors"]


def test_append_text_appends_locally(tmp_path):
  log = tmp_path / "a" / "metrics.jsonl"
  storage.append_text(log, '{"step": 1}\n')
  storage.append_text(log, '{"step": 2}\n')
  assert metrics_writer.read_metrics(tmp_path / "a") == [{"step": 1}, {"step": 2}]
