"""evaluate: outputs on the COCO and H36M samples, agreement with a direct metric run,
resumability, atomic files; compute_metrics on hand-made perfect predictions."""

import importlib.util
import json
import os
import pathlib

import jax
import numpy as np
import pytest

from configs import tiny
from kptjax import evaluate, metrics
from kptjax.data import tokenizer as tok_lib
from kptjax.data.sources import read_dataset


def _config(**decode):
  config = tiny.get_config().unlock()
  config.decode.batch_persons = 4
  config.decode.constrained = True
  for k, v in decode.items():
    if k in config.decode:
      config.decode[k] = v
    else:
      config.data[k] = v
  return config.lock()


@pytest.fixture(scope="module")
def tokenizer():
  return tok_lib.load_tokenizer("")


def _coco(shared_data):
  d = shared_data / "coco"
  return f"coco,ann_file={d / 'test_coco.json'},image_root={d}", str(d / "test_coco.json")


@pytest.fixture(scope="module")
def coco_run(shared_data, model_params, tokenizer, tmp_path_factory):
  dataset, _ = _coco(shared_data)
  out = str(tmp_path_factory.mktemp("coco_eval"))
  result = evaluate.run(_config(), out, dataset=dataset, max_persons=5, progress=False,
                        model_params=model_params, tokenizer=tokenizer)
  return out, result


def test_coco_outputs_and_metrics(shared_data, coco_run):
  out, result = coco_run
  assert sorted(os.listdir(out)) == ["metrics.json", "predictions.json"]   # nothing half-done
  preds = json.load(open(os.path.join(out, "predictions.json")))
  assert len(preds) == 5
  for p in preds:
    assert set(p) == {"image_id", "category_id", "keypoints", "score", "missing"}
    assert len(p["keypoints"]) == 17 * 3 and 0 <= p["score"] <= 1
  saved = json.load(open(os.path.join(out, "metrics.json")))
  assert saved["num_persons"] == 5 and saved["num_answers"] == 85
  assert saved["parse_failures"] == 0                # constrained decoding, random weights
  assert len(saved["per_keypoint"]) == 17 and saved["per_keypoint"][0]["keypoint"] == "nose"
  # AP recomputed from predictions.json on the same images equals the reported one.
  _, gt = _coco(shared_data)
  images = sorted({p["image_id"] for p in preds})
  direct = metrics.coco_keypoint_ap(gt, preds, image_ids=images)
  assert saved["coco"] == pytest.approx(direct)
  assert {"PCK@0.05", "PCK@0.1", "PCK@0.2"} <= set(saved["pck"])


def test_finished_run_is_not_recomputed(shared_data, coco_run, model_params, tokenizer):
  out, result = coco_run
  stamp = os.path.getmtime(os.path.join(out, "metrics.json"))
  again = evaluate.run(_config(), out, dataset=_coco(shared_data)[0], max_persons=5,
                       progress=False, model_params=None, tokenizer=None)  # would need a model
  assert again == json.load(open(os.path.join(out, "metrics.json")))
  assert os.path.getmtime(os.path.join(out, "metrics.json")) == stamp


def test_interrupted_run_resumes(shared_data, coco_run, model_params, tokenizer, tmp_path):
  """Persons already in predictions.partial.jsonl are not decoded again; a truncated last
  line (a crash mid-write) is ignored."""
  out, _ = coco_run
  first = json.load(open(os.path.join(out, "predictions.json")))
  done = {"index": 0, "image_id": first[0]["image_id"], "ann_id": 0,
          "keypoints": np.array(first[0]["keypoints"]).reshape(17, 3).tolist(),
          "score": 0.123, "ok": [True] * 17, "texts": [""] * 17}
  partial = tmp_path / evaluate.PARTIAL
  partial.write_text(json.dumps(done) + "\n" + '{"index": 1, "image_')
  evaluate.run(_config(), str(tmp_path), dataset=_coco(shared_data)[0], max_persons=5,
               progress=False, model_params=model_params, tokenizer=tokenizer)
  preds = json.load(open(tmp_path / "predictions.json"))
  assert preds[0]["score"] == 0.123                   # taken from the partial file
  assert [p["keypoints"] for p in preds[1:]] == [p["keypoints"] for p in first[1:]]
  assert not partial.exists()


def test_h36m_3d_predictions_and_mpjpe(shared_data, model_params, tokenizer, tmp_path):
  d = shared_data / "h36m"
  dataset = (f"h36m,ann_file={d / 'h36m_coco.json'},image_root={d},"
             f"camera_file={d / 'cameras.from_pkl.json'}")
  config = _config(coord_format="decimal3d", max_new_tokens=26)
  result = evaluate.run(config, str(tmp_path), dataset=dataset, max_persons=2, progress=False,
                        model_params=model_params, tokenizer=tokenizer)
  preds = json.load(open(tmp_path / "predictions.json"))
  assert len(preds) == 2 and np.array(preds[0]["keypoints_3d"]).shape == (17, 3)
  assert result["parse_failures"] == 0
  assert set(result["mpjpe"]["per_action"]) == {"Directions", "SittingDown"}
  assert result["mpjpe"]["MPJPE"] > 0 and result["mpjpe"]["PA-MPJPE"] > 0
  assert "coco" not in result


def test_compute_metrics_perfect_mpii_with_head_boxes(shared_data):
  """Perfect predictions: PCKh 100, PCK 1, no failures; head boxes switch PCKh on."""
  d = shared_data / "mpii"
  records = read_dataset("mpii", json_file=str(d / "test_mpii.json"), image_root=str(d))
  for r in records:
    r.head_box = np.array([0, 0, 30, 40], np.float32)
  entries = [{"index": i, "image_id": r.image_id, "ann_id": r.ann_id,
              "keypoints": np.c_[r.keypoints[:, :2], np.full(16, 0.9)].tolist(),
              "score": 0.9, "ok": [True] * 16, "texts": [""] * 16}
             for i, r in enumerate(records)]
  names = [f"k{i}" for i in range(16)]
  out = evaluate.compute_metrics(records, entries, names, pckh_variant="locllm")
  assert out["pckh"]["PCKh@0.5"] == pytest.approx(100.0)
  assert out["pckh"]["variant"] == "locllm"
  assert out["pck"]["PCK@0.05"] == pytest.approx(1.0)
  assert out["parse_failures"] == 0 and "coco" not in out
  row = out["per_keypoint"][6]                      # pelvis: a novel keypoint for COCO models
  assert row["keypoint"] == "k6" and "PCKh@0.5" in row


def test_load_model_restores_a_training_checkpoint(model_params, tmp_path):
  """A workdir as kptjax.train leaves it (checkpoints/ + model_config.json) gives back the
  saved params, and its model section wins over the config's."""
  from kptjax.checkpoint import Checkpointer
  from kptjax.train_step import TrainState
  _, params = model_params
  params = jax.tree.map(np.asarray, params)
  ckpt = Checkpointer(tmp_path / "checkpoints", every=1, keep=1, async_save=False)
  ckpt.save(7, TrainState(step=np.int32(7), params=params, opt_state={"count": np.int32(0)}),
            force=True)
  ckpt.wait()
  model_config = tiny.get_config().model.to_dict()
  (tmp_path / "model_config.json").write_text(json.dumps(model_config))
  config = _config().unlock()
  config.model.remat_policy = "none"            # the workdir's model section replaces this
  config, model, restored = evaluate.load_model(config.lock(), str(tmp_path))
  assert config.model.remat_policy == model_config["remat_policy"]
  jax.tree.map(np.testing.assert_array_equal, restored, params)
  with pytest.raises(Exception, match="no such checkpoint"):
    evaluate.load_model(config, str(tmp_path / "missing"))


def test_train_evaluator_hook(shared_data, model_params):
  """kptjax.train's periodic evaluation: scalars from config.data.eval with given params."""
  import types
  config = _config().unlock()
  d = shared_data / "coco"
  config.data.eval.source = "coco"
  config.data.eval.ann_file = str(d / "test_coco.json")
  config.data.eval.image_root = str(d)
  config.decode.eval_persons = 3
  model, params = model_params
  eval_fn = evaluate.make_train_evaluator(config.lock(), model, None)
  out = eval_fn(types.SimpleNamespace(params=params), 10)
  assert set(out) == {"parse_failure_rate", "PCK@0.05", "PCK@0.1", "PCK@0.2", "AP"}
  assert out["parse_failure_rate"] == 0.0
  assert all(isinstance(v, float) for v in out.values())


def test_eval_sweep_tables_and_no_recompute(shared_data, model_params, tokenizer, tmp_path):
  spec = importlib.util.spec_from_file_location(
      "eval_sweep", pathlib.Path(__file__).resolve().parents[1] / "experiments" / "eval_sweep.py")
  sweep = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(sweep)
  dataset = "sample:" + _coco(shared_data)[0]
  decodes = ["constrained=True", "constrained=True,share_prefix=True"]
  rows = sweep.run_sweep(_config(), ["runs/a"], [dataset], decodes, str(tmp_path),
                         max_persons=2, progress=False, model_params=model_params,
                         tokenizer=tokenizer)
  assert [(r["checkpoint"], r["dataset"], r["decode"]) for r in rows] == [
      ("a", "sample", decodes[0]), ("a", "sample", decodes[1])]
  assert rows[0]["AP"] is not None and rows[0]["parse_failures"] == 0
  csv_lines = (tmp_path / "sweep.csv").read_text().splitlines()
  assert len(csv_lines) == 3 and csv_lines[0].startswith("checkpoint,dataset,decode")
  assert (tmp_path / "sweep.md").read_text().count("\n") == 4
  cell = tmp_path / "a" / "sample" / "constrained=True" / "metrics.json"
  stamp = cell.stat().st_mtime
  again = sweep.run_sweep(_config(), ["runs/a"], [dataset], decodes, str(tmp_path),
                          max_persons=2, progress=False)          # no model: nothing to run
  assert again == rows and cell.stat().st_mtime == stamp


@pytest.mark.parametrize("source,folder,ann", [("ap10k", "ap10k", "test_ap10k.json"),
                                               ("crowdpose", "crowdpose", "test_crowdpose.json")])
def test_compute_metrics_perfect_coco_format_other_specs(shared_data, source, folder, ann):
  """Perfect predictions on AP-10K (one category per species) and CrowdPose (14 keypoints,
  no 'area') score AP 1 with their spec's sigmas: the results carry the annotations'
  category ids."""
  from kptjax.keypoints import get_spec
  d = shared_data / folder
  records = read_dataset(source, ann_file=str(d / ann), image_root=str(d))
  spec = get_spec(records[0].spec)
  entries = [{"index": i, "image_id": r.image_id, "ann_id": r.ann_id,
              "keypoints": np.c_[r.keypoints[:, :2], np.full(spec.num_keypoints, 0.9)].tolist(),
              "score": 0.9, "ok": [True] * spec.num_keypoints, "texts": [""] * spec.num_keypoints}
             for i, r in enumerate(records)]
  out = evaluate.compute_metrics(records, entries, spec.names, coco_gt=str(d / ann),
                                 sigmas=spec.sigmas)
  assert out["coco"]["AP"] == pytest.approx(1.0)
  assert out["pck"]["PCK@0.05"] == pytest.approx(1.0)
