"""provenance: one record of what made a result; compare lists exactly the fields that differ."""

import json
import os

from kptjax.evaluation import provenance


def _record(tmp_path, **overrides):
  ann = tmp_path / "ann.json"
  if not ann.exists():
    ann.write_text("{}")
  kw = dict(checkpoint=str(tmp_path / "run"), step=7,
            configs={"model": {"width": 32}, "decode": {"constrained": True}},
            dataset="coco,ann_file=" + str(ann), files=[str(ann), str(tmp_path)],
            evaluation={"max_persons": None})
  kw.update(overrides)
  return provenance.build(**kw)


def test_record_fields_and_json_round_trip(tmp_path):
  r = _record(tmp_path)
  assert r["checkpoint"] == {"path": str(tmp_path / "run"), "step": 7}
  assert set(r["config_sha256"]) == {"model", "decode"} and len(r["config_sha256"]["model"]) == 64
  ann = str(tmp_path / "ann.json")
  assert list(r["dataset"]["files"]) == [ann]               # directories are not stamped
  assert r["dataset"]["files"][ann]["size"] == 2
  assert r["kptjax_version"]
  assert provenance.compare(json.loads(json.dumps(r)), r) == []


def test_compare_names_each_differing_field(tmp_path):
  base = _record(tmp_path)
  assert provenance.compare(base, _record(tmp_path, step=8)) == ["checkpoint.step"]
  assert provenance.compare(base, _record(tmp_path, checkpoint=str(tmp_path / "other"))) == [
      "checkpoint.path"]
  other_model = _record(tmp_path, configs={"model": {"width": 64},
                                           "decode": {"constrained": True}})
  assert provenance.compare(base, other_model) == ["config_sha256.model"]
  assert provenance.compare(base, _record(tmp_path, evaluation={"max_persons": 5})) == [
      "evaluation.max_persons"]
  assert provenance.compare(base, _record(tmp_path, evaluation={"max_persons": 5}),
                            ignore=("evaluation",)) == []
  assert provenance.compare(None, base) == ["<missing record>"]
  assert provenance.compare({k: v for k, v in base.items() if k != "evaluation"}, base) == [
      "evaluation"]


def test_a_changed_data_file_is_a_difference(tmp_path):
  base = _record(tmp_path)
  ann = tmp_path / "ann.json"
  st = ann.stat()
  os.utime(ann, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
  diff = provenance.compare(base, _record(tmp_path))
  assert diff == [f"dataset.files.{ann}.mtime_ns"]
  ann.write_text("{} ")
  assert f"dataset.files.{ann}.size" in provenance.compare(base, _record(tmp_path))


def test_config_hash_ignores_key_order():
  assert provenance.config_hash({"a": 1, "b": [1, 2]}) == provenance.config_hash({"b": [1, 2],
                                                                                  "a": 1})
  assert provenance.config_hash({"a": 1}) != provenance.config_hash({"a": 2})
