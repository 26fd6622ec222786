"""evaluate: outputs on the COCO and H36M samples, agreement with a direct metric run,
resumability, atomic files; compute_metrics on hand-made perfect predictions; and the
prompted tasks (MP-100 protocol of KptLLM on the synthetic objects: the questions asked
(keypoints labeled in the query and a support; supports seeded), answers mapped back to
image pixels through the crop, PCK per category; a real tiny model runs end to end)."""

import importlib.util
import json
import os
import pathlib

import jax
import numpy as np
import pytest

from configs import tiny
from kptjax import evaluate
from kptjax.data import cape, pipeline, tokenizer as tok_lib
from kptjax.data.sources import read_dataset
from kptjax.evaluation import loading, oks, prompted, protocols, results
from kptjax.inference import decode
from kptjax.models import kptllm


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
  assert sorted(os.listdir(out)) == ["metrics.json", "predictions.json",
                                     "predictions.provenance.json"]      # nothing half-done
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
  direct = oks.coco_keypoint_ap(gt, preds, image_ids=images)
  assert saved["coco"] == pytest.approx(direct)
  assert {"PCK@0.05", "PCK@0.1", "PCK@0.2"} <= set(saved["pck"])
  assert saved["protocol"] == {"name": "coco", "task": "keypoints", "heldout_keypoints": None,
                               "padding": float(_config().data.padding)}


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
          "score": 0.123, "missing": [], "texts": [""] * 17}
  record = json.load(open(os.path.join(out, "metrics.json")))["provenance"]
  header = {"provenance": {k: v for k, v in record.items() if k != "evaluation"}}
  partial = tmp_path / results.PARTIAL
  partial.write_text(json.dumps(header) + "\n" + json.dumps(done) + "\n" + '{"index": 1, "image_')
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
              "score": 0.9, "missing": [], "texts": [""] * 16}
             for i, r in enumerate(records)]
  names = [f"k{i}" for i in range(16)]
  out = protocols.compute_metrics(records, entries, names, pckh_variant="locllm")
  assert out["pckh"]["PCKh@0.5"] == pytest.approx(100.0)
  assert out["pckh"]["variant"] == "locllm"
  assert out["pck"]["PCK@0.05"] == pytest.approx(1.0)
  assert out["parse_failures"] == 0 and "coco" not in out
  row = out["per_keypoint"][6]                      # pelvis: a novel keypoint for COCO models
  assert row["keypoint"] == "k6" and "PCKh@0.5" in row


def test_load_model_restores_a_training_checkpoint(model_params, tmp_path):
  """A workdir as kptjax.train leaves it (checkpoints/ + model_config.json) gives back the
  saved params, and its model section wins over the config's."""
  from kptjax.training.checkpoint import Checkpointer
  from kptjax.training.step import TrainState
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
  config, model, restored = loading.load_model(config.lock(), str(tmp_path))
  assert config.model.remat_policy == model_config["remat_policy"]
  jax.tree.map(np.testing.assert_array_equal, restored, params)
  with pytest.raises(Exception, match="no such checkpoint"):
    loading.load_model(config, str(tmp_path / "missing"))


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
  cell = tmp_path / sweep.cell_dir_name("runs/a", "a") / "sample" / "constrained=True" / \
      "metrics.json"
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
              "score": 0.9, "missing": [], "texts": [""] * spec.num_keypoints}
             for i, r in enumerate(records)]
  out = protocols.compute_metrics(records, entries, spec.names, coco_gt=str(d / ann),
                                 sigmas=spec.sigmas)
  assert out["coco"]["AP"] == pytest.approx(1.0)
  assert out["pck"]["PCK@0.05"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------
# Missing answers, unreadable images, provenance.


def _centre_dataset(root, corrupt=()):
  """A COCO-format set written here: 3 images of 64 x 64 px, one person each, box
  [8, 8, 48, 48], all 17 keypoints at the box centre (where the crop centre maps back).
  Images in ``corrupt`` (by index) hold bytes that are no image."""
  from PIL import Image
  rng = np.random.default_rng(0)
  images, anns = [], []
  for i in range(3):
    name = f"img{i}.jpg"
    if i in corrupt:
      (root / name).write_bytes(b"this is not a jpeg")
    else:
      Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / name)
    images.append({"id": i + 1, "file_name": name, "width": 64, "height": 64})
    anns.append({"id": 10 + i, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                 "bbox": [8, 8, 48, 48], "area": 48.0 * 48.0, "num_keypoints": 17,
                 "keypoints": [31.5, 31.5, 2] * 17})
  ann = root / "centre.json"
  ann.write_text(json.dumps({"images": images, "annotations": anns,
                             "categories": [{"id": 1, "name": "person"}]}))
  return f"coco,ann_file={ann},image_root={root}", str(ann)


def _answer_everywhere(monkeypatch, ok):
  """Every answer of the decoder parses to the crop centre (ok) or does not parse."""
  from kptjax.inference import parsing

  def scorer(tokens, probs, token_strs, eos_id, count):
    if ok:
      return parsing.ParsedAnswer(np.full(count, 0.5, np.float32), 1.0, True, "[0.5,0.5]")
    return parsing.ParsedAnswer(np.zeros(count, np.float32), 0.0, False, "no idea")
  monkeypatch.setattr(parsing, "score_answer", scorer)


def test_unparseable_answers_are_never_hits(model_params, tokenizer, tmp_path, monkeypatch):
  """Ground truth at the crop centre: an unparseable answer placed there would be a
  perfect PCK hit and OKS match. Missing answers score 0 and are counted."""
  dataset, _ = _centre_dataset(tmp_path)
  _answer_everywhere(monkeypatch, ok=False)
  out = tmp_path / "eval"
  result = evaluate.run(_config(), str(out), dataset=dataset, progress=False,
                        model_params=model_params, tokenizer=tokenizer)
  assert result["pck"]["PCK@0.25"] == 0.0 and result["pck"]["count"] == 51
  assert result["coco"]["AP"] == 0.0 and result["coco"]["AR"] == 0.0
  assert result["parse_failures"] == 51 and result["parse_failure_rate"] == 1.0
  assert result["missing_keypoints"] == 51 and result["image_errors"] == 0
  assert result["per_keypoint"][0]["missing"] == 3
  preds = json.load(open(out / "predictions.json"))
  assert [p["missing"] for p in preds] == [list(range(17))] * 3
  assert all(v == 0 for p in preds for v in p["keypoints"])


def test_corrupt_image_people_are_scored_as_missing(model_params, tokenizer, tmp_path,
                                                    monkeypatch, caplog):
  """One corrupt image of three: the run finishes, its person stays in every denominator
  with all keypoints missing, and metrics.json counts and names it."""
  dataset, _ = _centre_dataset(tmp_path, corrupt=(1,))
  _answer_everywhere(monkeypatch, ok=True)
  out = tmp_path / "eval"
  with caplog.at_level("WARNING"):
    result = evaluate.run(_config(), str(out), dataset=dataset, progress=False,
                          model_params=model_params, tokenizer=tokenizer)
  assert result["num_persons"] == 3 and result["image_errors"] == 1
  assert result["unreadable_images"] == [str(tmp_path / "img1.jpg")]
  assert result["missing_keypoints"] == 17 and result["parse_failures"] == 0
  assert result["num_answers"] == 34
  assert result["pck"]["count"] == 51 and result["pck"]["PCK@0.05"] == pytest.approx(2 / 3)
  assert result["coco"]["AR"] == pytest.approx(2 / 3)       # its person is not matched
  preds = json.load(open(out / "predictions.json"))
  assert [len(p["missing"]) for p in preds] == [0, 17, 0]
  assert any("img1.jpg" in r.getMessage() and "missing" in r.getMessage()
             for r in caplog.records)


def test_missing_image_file_people_are_scored_as_missing(model_params, tokenizer, tmp_path,
                                                         monkeypatch):
  """An image file absent from disk: the reader keeps its person for evaluation (training
  readers skip it), so it is scored as missing instead of leaving the denominator."""
  dataset, _ = _centre_dataset(tmp_path)
  (tmp_path / "img2.jpg").unlink()
  _answer_everywhere(monkeypatch, ok=True)
  result = evaluate.run(_config(), str(tmp_path / "eval"), dataset=dataset, progress=False,
                        model_params=model_params, tokenizer=tokenizer)
  assert result["num_persons"] == 3 and result["image_errors"] == 1
  assert result["unreadable_images"] == [str(tmp_path / "img2.jpg")]
  assert result["pck"]["count"] == 51 and result["pck"]["PCK@0.05"] == pytest.approx(2 / 3)


def _run(out, dataset, model_params, tokenizer, **kw):
  return evaluate.run(_config(**kw.pop("decode", {})), str(out), dataset=dataset,
                      progress=False, model_params=model_params, tokenizer=tokenizer,
                      max_persons=2, **kw)


def test_results_of_another_checkpoint_or_config_are_recomputed(shared_data, model_params,
                                                                tokenizer, tmp_path, caplog):
  dataset = _coco(shared_data)[0]
  first = _run(tmp_path, dataset, model_params, tokenizer, checkpoint="runs/a", step=7)
  assert first["provenance"]["checkpoint"]["step"] == 7 and first["checkpoint_step"] == 7
  sidecar = json.load(open(tmp_path / "predictions.provenance.json"))
  assert sidecar["provenance"] == first["provenance"]
  assert _run(tmp_path, dataset, None, None, checkpoint="runs/a", step=7) == first   # reused
  cases = [dict(checkpoint="runs/a", step=8), dict(checkpoint="runs/b", step=8),
           dict(checkpoint="runs/b", step=8, decode={"padding": 1.3})]   # the crop
  expected = ["checkpoint.step", "checkpoint.path", "config_sha256.data"]
  for kw, field in zip(cases, expected):
    caplog.clear()
    with caplog.at_level("WARNING"):
      again = _run(tmp_path, dataset, model_params, tokenizer, **kw)
    assert again["provenance"] != first["provenance"]
    lines = [r.getMessage() for r in caplog.records if "recomputing from scratch" in r.getMessage()]
    assert len(lines) == 1 and field in lines[0]
    first = again


def test_predictions_file_changed_after_the_run_is_recomputed(shared_data, model_params,
                                                              tokenizer, tmp_path):
  """predictions.json edited after the run no longer matches its sidecar's hash."""
  dataset = _coco(shared_data)[0]
  _run(tmp_path, dataset, model_params, tokenizer)
  preds = json.load(open(tmp_path / "predictions.json"))
  original = preds[0]["score"]
  preds[0]["score"] = original + 0.5
  (tmp_path / "predictions.json").write_text(json.dumps(preds))
  _run(tmp_path, dataset, model_params, tokenizer)
  assert json.load(open(tmp_path / "predictions.json"))[0]["score"] == original


def test_partial_predictions_of_another_checkpoint_are_not_merged(shared_data, model_params,
                                                                  tokenizer, tmp_path):
  """A run killed with checkpoint step 7 and resumed at step 8 starts again; resumed at
  step 7 it merges (test_interrupted_run_resumes)."""
  dataset = _coco(shared_data)[0]
  done = _run(tmp_path / "seven", dataset, model_params, tokenizer, checkpoint="runs/a", step=7)
  header = {"provenance": {k: v for k, v in done["provenance"].items() if k != "evaluation"}}
  entry = json.loads(json.dumps(dict(index=0, image_id=785, ann_id=0, score=0.123, missing=[],
                                     keypoints=[[1.0, 2.0, 0.5]] * 17, texts=[""] * 17)))
  for step, merged in ((8, False), (7, True)):
    out = tmp_path / f"resumed{step}"
    out.mkdir()
    (out / results.PARTIAL).write_text(json.dumps(header) + "\n" + json.dumps(entry) + "\n")
    _run(out, dataset, model_params, tokenizer, checkpoint="runs/a", step=step)
    preds = json.load(open(out / "predictions.json"))
    assert (preds[0]["score"] == 0.123) == merged


def test_eval_sweep_labels_checkpoints_apart_with_their_steps(shared_data, model_params,
                                                              tokenizer, tmp_path):
  """Two runs whose checkpoint folders are both called 'checkpoints' give two rows and
  two cells; the step column is the step each was evaluated at."""
  from kptjax.training.checkpoint import Checkpointer
  from kptjax.training.step import TrainState
  spec = importlib.util.spec_from_file_location(
      "eval_sweep", pathlib.Path(__file__).resolve().parents[1] / "experiments" / "eval_sweep.py")
  sweep = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(sweep)
  _, params = model_params
  params = jax.tree.map(np.asarray, params)
  dirs = []
  for run_name, step in (("a", 3), ("b", 5)):
    d = tmp_path / "runs" / run_name / "checkpoints"
    ckpt = Checkpointer(d, every=1, keep=1, async_save=False)
    ckpt.save(step, TrainState(step=np.int32(step), params=params,
                               opt_state={"count": np.int32(0)}), force=True)
    ckpt.wait()
    dirs.append(str(d))
  rows = sweep.run_sweep(_config(), dirs, ["sample:" + _coco(shared_data)[0]],
                         ["constrained=True"], str(tmp_path / "out"), max_persons=1,
                         progress=False, tokenizer=tokenizer)
  assert [(r["checkpoint"], r["step"]) for r in rows] == [("a/checkpoints", 3),
                                                          ("b/checkpoints", 5)]
  assert len({sweep.cell_dir_name(d, r["checkpoint"]) for d, r in zip(dirs, rows)}) == 2
  assert sweep.checkpoint_labels(["x/checkpoints", "y/checkpoints", ""]) == [
      "x/checkpoints", "y/checkpoints", "config-weights"]
  assert (tmp_path / "out" / "sweep.csv").read_text().splitlines()[0].startswith(
      "checkpoint,step,dataset")


# ---------------------------------------------------------------------------
# Prompted tasks (KptLLM / CapeLLM): the MP-100 protocol.


@pytest.fixture(scope="module")
def objects(tmp_path_factory):
  c = tiny.get_config().unlock()
  c.model.kpt.enabled = True
  c.model.remat_policy = "none"
  c.data.eval.update(source="synthetic_objects", path=str(tmp_path_factory.mktemp("o")),
                     num_images=6, split="val")
  c.data.update(coord_format="keypoint_token", max_len=96)
  config = c.lock()
  return config, pipeline.load_records(config, "eval"), tok_lib.load_tokenizer("")


def test_questions_follow_the_support_protocol(objects):
  config, records, _ = objects
  questions = list(prompted.questions(config, records, "visual", 1, seed=3))
  draws = cape.sample_supports(records, 1, seed=3)
  expected = sum(int(cape.support_keypoint_mask(records[q], [records[s] for s in sup]).sum())
                 for q, sup in draws)
  assert len(questions) == expected > 0
  q = questions[0]
  assert q["support_image"].shape == (1, 32, 32, 3) and q["support_mask"].tolist() == [1.0]
  assert np.all((q["support_xy"] >= 0) & (q["support_xy"] <= 1))
  again = list(prompted.questions(config, records, "visual", 1, seed=3))
  np.testing.assert_array_equal(q["support_xy"], again[0]["support_xy"])


class _FakeKptLLM:
  """Stands in for KptLLM's prompt path (``embed_prompts`` under ``apply``)."""

  def embed_prompts(self):
    pass

  def apply(self, variables, images, xy, mask, method):
    return np.zeros((images.shape[0], 1, 4), np.float32)


def test_visual_answers_map_back_like_textual_ones(objects, monkeypatch):
  """The crop centre scores the same in both tasks on the keypoints both ask."""
  config, records, tok = objects

  def centre(model, params, images, tokens, mask, **kw):
    return np.full((tokens.shape[0], 2), 0.5, np.float32), None
  monkeypatch.setattr(decode, "generate_keypoints", centre)
  monkeypatch.setattr(jax, "jit", lambda f: f)
  vis, txt = (prompted.evaluate_cape(config, _FakeKptLLM(), None, tok, records, task=t,
                                     rows_per_batch=4, threshold=0.5)
              for t in ("visual", "textual"))
  assert vis["questions"] == txt["questions"]          # synthetic objects: all labeled
  assert vis["per_category"] == txt["per_category"] and 0 < vis["PCK@0.5"] < 1


@pytest.mark.parametrize("coord_format", ["keypoint_token", "decimal2d"])
def test_answers_map_back_to_image_pixels(objects, monkeypatch, coord_format):
  """A model answering the crop centre (by the head, or as LocLLM's text) is scored at
  the box centre of every instance."""
  config, records, tok = objects
  config = config.copy_and_resolve_references()       # the fixture's config stays as is
  config.data.coord_format = coord_format
  text = tok.encode("[0.500,0.500]", add_special_tokens=False) + [tok.eos_token_id, 7]

  def centre(model, params, images, tokens, mask, force_keypoint=True, **kw):
    assert force_keypoint == (coord_format == "keypoint_token")
    xy = np.full((tokens.shape[0], 2), 0.5 if force_keypoint else 0.0, np.float32)
    return xy, np.tile(np.asarray(text, np.int32), (tokens.shape[0], 1))
  monkeypatch.setattr(decode, "generate_keypoints", centre)
  out = prompted.evaluate_cape(config, None, None, tok, records, task="textual",
                               rows_per_batch=4)
  assert out["questions"] == sum(int((r.keypoints[:, 2] > 0).sum()) for r in records)
  assert out["keypoints"] == sum(r.num_keypoints for r in records)
  per_cat = {}                          # each instance's PCK, then the mean per category
  for r in records:
    x, y, w, h = r.box
    d = np.linalg.norm(r.keypoints[:, :2] - [x + w / 2, y + h / 2], axis=1) / max(w, h)
    per_cat.setdefault(r.category, []).append(np.mean(d < 0.2))
  assert out["per_category"] == pytest.approx({c: np.mean(v) for c, v in per_cat.items()},
                                              abs=1e-6)
  assert out["PCK@0.2"] == pytest.approx(np.mean([v for vs in per_cat.values() for v in vs]))


def test_tiny_model_end_to_end(objects, monkeypatch):
  """A real tiny KptLLM, visual 1-shot: the questions of one query share its image
  prefix (one crop per query in the program, ``prefix_len`` > 0; that this gives the
  tokens and xy of one full row per question is test_decode's
  test_shared_prefix_equals_rows_and_teacher_forcing), in one batch shape."""
  config, records, tok = objects
  params = kptllm.init_params(config.model, jax.random.key(0, impl="unsafe_rbg"))
  model = kptllm.KptLLM(config.model)
  calls, real = [], decode.generate_keypoints

  def spy(model, params, images, tokens, mask, **kw):
    calls.append((len(images), len(tokens), kw["prefix_len"]))
    return real(model, params, images, tokens, mask, **kw)
  monkeypatch.setattr(decode, "generate_keypoints", spy)
  out = prompted.evaluate_cape(config, model, params, tok, records[:3], task="visual",
                               shots=1, rows_per_batch=8, max_new_tokens=1)
  assert out["questions"] > 0 and 0.0 <= out["PCK@0.2"] <= 1.0
  assert set(out["per_category"]) <= {r.category for r in records}
  assert calls and all(p > 0 and n < b for n, b, p in calls)          # shared prefix
  assert len({(n, b) for n, b, _ in calls}) == 1                      # one program


def test_semantic_accuracy_by_exact_description(objects, monkeypatch):
  """An oracle that always answers the square's top-left description is right exactly on
  the squares' top-left corners; prompts come from the query image itself."""
  config, records, tok = objects
  from kptjax.keypoints import get_spec
  answer = get_spec("mp100/square").descriptions[0]
  ids = tok.encode(answer.upper(), add_special_tokens=False) + [tok.eos_token_id]
  seen = []

  class Fake:
    def embed_prompts(self):
      pass

    def apply(self, variables, images, xy, mask, method):
      seen.append(np.asarray(xy))
      return np.zeros((images.shape[0], 1, 4), np.float32)

  def oracle(model, params, images, tokens, mask, force_keypoint=True, **kw):
    assert not force_keypoint
    return None, np.tile(np.asarray(ids, np.int32), (tokens.shape[0], 1))
  monkeypatch.setattr(decode, "generate_keypoints", oracle)
  monkeypatch.setattr(jax, "jit", lambda f: f)
  out = prompted.evaluate_semantic(config, Fake(), None, tok, records, rows_per_batch=4)
  squares = [r for r in records if r.category == "square"]
  assert out["questions"] == sum(r.num_keypoints for r in records)
  expected = len(squares) / out["questions"]
  assert out["accuracy"] == pytest.approx(expected)
  assert squares and out["per_category"]["square"] == pytest.approx(0.25)   # 1 of 4 corners
  assert all(x.shape[1:] == (1, 1, 2) for x in seen)


def test_run_writes_metrics_and_reads_them_back(objects, monkeypatch, tmp_path):
  config, _, _ = objects
  calls = []

  def fake_load(cfg, checkpoint="", step=None):
    calls.append(checkpoint)
    return cfg, None, None

  def centre(model, params, images, tokens, mask, **kw):
    return np.full((tokens.shape[0], 2), 0.5, np.float32), None
  monkeypatch.setattr(decode, "generate_keypoints", centre)
  first = evaluate.run(config, str(tmp_path), task="textual", model_loader=fake_load)
  assert (tmp_path / "metrics.json").exists() and first["task"] == "textual"
  again = evaluate.run(config, str(tmp_path), task="textual", model_loader=fake_load)
  assert again["PCK@0.2"] == first["PCK@0.2"] and calls == [""]    # not recomputed


def test_ap10k_family_perfect_answers_score_ap_one(shared_data, monkeypatch):
  """CLAMP's split on the real AP-10K sample: the Felidae family holds the jaguar only;
  answering its ground truth (through the crop) gives OKS AP 1 and PCK 1."""
  from kptjax.data import transforms
  from kptjax.data.sources import read_dataset
  from kptjax.keypoints import get_spec
  folder = shared_data / "ap10k"
  records = read_dataset("ap10k_family", folder / "test_ap10k.json", folder,
                         families="Felidae")
  assert len(records) == 1 and records[0].category == "jaguar"
  c = tiny.get_config().unlock()
  c.model.kpt.enabled = True
  c.data.update(coord_format="keypoint_token", max_len=160)
  side = c.model.vit.image_size
  crop = transforms.crop_person(records[0], transforms.load_record_image(records[0]),
                                (side, side), padding=c.data.padding, spec=get_spec("ap10k17"))
  labeled = np.flatnonzero(records[0].keypoints[:, 2] > 0)
  truth = crop["keypoints"][labeled, :2] / side

  def oracle(model, params, images, tokens, mask, **kw):
    out = np.zeros((tokens.shape[0], 2), np.float32)
    out[:len(truth)] = truth
    return out, None
  monkeypatch.setattr(decode, "generate_keypoints", oracle)
  out = prompted.evaluate_cape(c, None, None, tok_lib.load_tokenizer(""), records, task="textual",
                               rows_per_batch=len(labeled),
                               coco_gt=str(folder / "test_ap10k.json"))
  assert out["questions"] == len(labeled) == 16
  assert out["PCK@0.2"] == 1.0 and out["AP"] == pytest.approx(1.0)


def test_ap10k_unparseable_answers_score_nothing(shared_data, monkeypatch, tmp_path):
  """Decimal answers that do not parse are missing: OKS AP 0 and PCK 0 on the AP-10K
  sample (they once became inf, then NaN through the crop, and scored AP ~1), counted."""
  from kptjax.data.sources import read_dataset
  folder = shared_data / "ap10k"
  records = read_dataset("ap10k_family", folder / "test_ap10k.json", folder,
                         families="Felidae")
  c = tiny.get_config().unlock()
  c.model.kpt.enabled = True
  c.data.update(coord_format="decimal2d", max_len=160)
  tok = tok_lib.load_tokenizer("")
  garbage = tok.encode("no idea", add_special_tokens=False) + [tok.eos_token_id]

  def babble(model, params, images, tokens, mask, force_keypoint=True, **kw):
    assert not force_keypoint
    return None, np.tile(np.asarray(garbage, np.int32), (tokens.shape[0], 1))
  monkeypatch.setattr(decode, "generate_keypoints", babble)
  out = prompted.evaluate_cape(c, None, None, tok, records, task="textual",
                               rows_per_batch=16, coco_gt=str(folder / "test_ap10k.json"))
  assert out["AP"] == 0.0 and out["PCK@0.2"] == 0.0
  assert out["questions"] == 16 and out["parse_failures"] == 16
  assert out["missing_keypoints"] == 16 and out["parse_failure_rate"] == 1.0


def test_unreadable_query_image_is_missing_and_counted(objects, monkeypatch, tmp_path):
  """A corrupt query image: its questions are asked of nobody, scored as misses and
  counted; the others are answered (here: perfectly, by an oracle on the crop)."""
  import copy
  import dataclasses
  config, records, tok = objects
  broken = tmp_path / "broken.png"
  broken.write_bytes(b"not a png")
  records = copy.copy(records)                 # a Records list: its specs come along
  records[0] = dataclasses.replace(records[0], image_path=str(broken), image_bytes=None)
  asked = []

  def oracle(model, params, images, tokens, mask, **kw):
    asked.append(tokens.shape[0])
    return np.full((tokens.shape[0], 2), 0.5, np.float32), None
  monkeypatch.setattr(decode, "generate_keypoints", oracle)
  out = prompted.evaluate_cape(config, None, None, tok, records, task="textual",
                               rows_per_batch=4)
  k0 = int((records[0].keypoints[:, 2] > 0).sum())
  assert out["image_errors"] == 1 and out["unreadable_images"] == [str(broken)]
  assert out["missing_keypoints"] == k0 and out["parse_failures"] == 0
  assert out["questions"] == sum(int((r.keypoints[:, 2] > 0).sum()) for r in records)
  assert out["num_answers"] == out["questions"] - k0


def test_ap10k_unparseable_answers_are_missing_not_perfect(shared_data, monkeypatch):
  """LocLLM-style text answers that never parse: every keypoint is missing, so PCK and
  OKS AP are 0 (an unparseable answer once became NaN through the inverse affine, and
  NaN matched perfectly: AP 0.99999)."""
  from kptjax.data.sources import read_dataset
  folder = shared_data / "ap10k"
  records = read_dataset("ap10k", folder / "test_ap10k.json", folder)
  c = tiny.get_config().unlock()
  c.data.update(coord_format="decimal2d", max_len=160)
  tok = tok_lib.load_tokenizer("")
  junk = np.asarray(tok.encode("no idea", add_special_tokens=False) + [tok.eos_token_id],
                    np.int32)

  def babble(model, params, images, tokens, mask, force_keypoint=True, **kw):
    return None, np.tile(junk, (tokens.shape[0], 1))
  monkeypatch.setattr(decode, "generate_keypoints", babble)
  out = prompted.evaluate_cape(c, None, None, tok, records, task="textual",
                               rows_per_batch=8, coco_gt=str(folder / "test_ap10k.json"))
  assert out["questions"] == out["missing"] == 32
  assert out["PCK@0.2"] == 0.0 and out["AP"] == 0.0 and out["AR"] == 0.0
