"""The main job (kptjax.demo): its outputs, the no-image baseline, and that the demo
model uses the image (it over-fits a handful of images)."""

import json
import os

import numpy as np
import pytest

from configs import demo as demo_config
from kptjax import demo
from kptjax.data.sources import PersonRecord
from kptjax.errors import ConfigError


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("kptjax_data")
  old = os.environ.get("KPTJAX_DATA_DIR")
  os.environ["KPTJAX_DATA_DIR"] = str(path)
  yield path
  if old is None:
    del os.environ["KPTJAX_DATA_DIR"]
  else:
    os.environ["KPTJAX_DATA_DIR"] = old


def _record(box, keypoints):
  kp = np.asarray(keypoints, np.float32)
  return PersonRecord(image_path="x.jpg", image_size=(200, 200),
                      box=np.asarray(box, np.float32), keypoints=kp, spec="coco17")


def test_mean_crop_position_is_the_mean_over_labelled_keypoints():
  config = demo_config.get_config()
  side = config.model.vit.image_size
  # Two square boxes whose crops map image pixels to crop pixels by a known scale.
  kp1 = np.zeros((17, 3), np.float32)
  kp2 = np.zeros((17, 3), np.float32)
  kp1[:, :2], kp1[:, 2] = (50.0, 50.0), 2      # box center: crop center
  kp2[:, :2], kp2[:, 2] = (20.0, 20.0), 2      # box corner
  kp2[3, 2] = 0                                # unlabelled: left out of the mean
  r1 = _record([0, 0, 100, 100], kp1)
  r2 = _record([20, 20, 100, 100], kp2)
  mean = demo.mean_crop_position(config, [r1, r2])
  crop_per_px = side / (100 * config.data.padding)
  corner = side / 2 - 50 * crop_per_px
  np.testing.assert_allclose(mean[0], [(side / 2 + corner) / 2] * 2, atol=1e-4)
  np.testing.assert_allclose(mean[3], [side / 2] * 2, atol=1e-4)
  # The baseline answers that mean mapped back into each person's box.
  entries = demo.baseline_entries(config, mean, [r2])
  np.testing.assert_allclose(np.asarray(entries[0]["keypoints"])[3, :2], [70, 70], atol=1e-2)


def test_demo_max_len_fits_every_round_of_every_keypoint():
  from kptjax.data import conversation
  from kptjax.data.tokenizer import load_tokenizer
  from kptjax.keypoints import get_spec
  config = demo_config.get_config()
  spec, tok = get_spec("coco17"), load_tokenizer("")
  side = config.model.vit.image_size
  kp = np.full((17, 3), side / 2, np.float32)
  kp[:, 2] = 2
  n = conversation.num_image_tokens(config.model)
  # The longest names, with 3-digit coordinates everywhere.
  longest = sorted(range(17), key=lambda i: -len(tok.encode(spec.names[i])))
  for ids in (longest[:config.data.rounds], list(range(config.data.rounds))):
    ex = conversation.encode_training_example(kp, side, spec, tok, config.data, n, None,
                                              image_token_id=config.model.image_token_id,
                                              keypoint_ids=ids)
    assert int(ex["num_rounds"]) == config.data.rounds
    assert ex["tokens"].shape == (config.data.max_len,)


@pytest.mark.parametrize("arg, message", [
    ("setps=100", "unknown arg 'setps'"),      # a typo is not silently the default run
    ("decay=0.4x", "decay='0.4x' is not a number"),
    ("scan=yes", "scan='yes' is not an integer"),
    ("steps", r"steps needs a value"),
    ("cur", r"cur needs a value"),
])
def test_demo_config_refuses_bad_args_by_name(arg, message):
  with pytest.raises(ConfigError, match=message):
    demo_config.get_config(arg)


def test_demo_config_parses_its_number_args():
  c = demo_config.get_config("steps=1350,decay=0.5,lr=1e-3,scan=1,cur=64:300")
  assert (c.train.num_steps, c.optim.decay_ratio, c.optim.lr) == (1350, 0.5, 1e-3)
  assert c.model.scan_layers is True and c.data.curriculum == "64:300"
  assert isinstance(c.train.num_steps, int) and isinstance(c.optim.decay_ratio, float)


def test_summary_table_sets_model_beside_baseline():
  model = dict.fromkeys(demo.SUMMARY_KEYS, 0.5)
  base = dict.fromkeys(demo.SUMMARY_KEYS, 0.25)
  table = demo.summary_table(model, base)
  assert "| PCK@0.1 | 0.500 | 0.250 | +0.250 |" in table.splitlines()


def test_demo_job_writes_metrics_overlays_and_resumes(data_dir, tmp_path, capsys):
  config = demo_config.get_config("smoke")
  workdir = str(tmp_path / "demo")
  result = demo.run(config, workdir)
  with open(os.path.join(workdir, "metrics.json")) as f:
    saved = json.load(f)
  assert saved["model"] == result["model"]
  for side in ("model", "baseline"):
    assert set(saved[side]) == set(demo.SUMMARY_KEYS)
    assert 0.0 <= saved[side]["PCK@0.1"] <= saved[side]["PCK@0.2"] <= 1.0
  assert saved["baseline"]["parse_failure_rate"] == 0.0
  assert len(saved["overlays"]) == config.data.eval.num_images
  for png in saved["overlays"]:
    with open(os.path.join(workdir, png), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.path.exists(os.path.join(workdir, "new_person.jpg"))
  assert "| PCK@0.1 |" in capsys.readouterr().out
  # A second run resumes: nothing is retrained or re-decoded, the numbers are the same.
  mtime = os.path.getmtime(os.path.join(workdir, "eval", "predictions.json"))
  again = demo.run(config, workdir)
  assert again["model"] == result["model"]
  assert os.path.getmtime(os.path.join(workdir, "eval", "predictions.json")) == mtime


def test_demo_model_overfits_a_handful_of_images(data_dir, tmp_path):
  """The image reaches the answer: trained on 4 images (all 17 keypoints each), the demo
  architecture (narrower) locates their keypoints, far above the no-image baseline."""
  config = demo_config.get_config(OVERFIT)
  result = demo.run(config, str(tmp_path / "overfit"))
  assert result["model"]["PCK@0.1"] >= 0.95, result
  assert result["model"]["AP"] >= result["baseline"]["AP"] + 0.5, result   # baseline: the mean of these 4


OVERFIT = "overfit=4,width=64,layers=2,rounds=1,batch=16,steps=400,lr=3e-3"
