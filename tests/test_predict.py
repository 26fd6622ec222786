"""predict: a PNG and valid JSON for a sample image; clear errors for bad input; viz."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import tiny
from kptjax import errors, predict, viz
from kptjax.data import tokenizer as tok_lib
from tests.conftest import REPO_ROOT


@pytest.fixture(scope="module")
def config():
  c = tiny.get_config().unlock()
  c.decode.constrained = True
  return c.lock()


def test_predict_writes_png_and_json(shared_data, config, model_params, tmp_path):
  image = shared_data / "coco" / "000000000785.jpg"
  result = predict.predict(
      config, str(image), box=predict.parse_box("280,44,218,346"),
      keypoints=["left wrist", "left_elbow", "Nose"], descriptions=["the tip of the nose"],
      names=["nose tip"], out_dir=str(tmp_path), model_params=model_params,
      tokenizer=tok_lib.load_tokenizer(""))
  names = [k["name"] for k in result["keypoints"]]
  assert names == ["left wrist", "left elbow", "nose", "nose tip"]
  assert result["keypoints"][3]["description"] == "the tip of the nose"
  for k in result["keypoints"]:
    assert k["parsed"] and 0 < k["score"] <= 1         # constrained: always an answer
    assert np.isfinite([k["x"], k["y"]]).all()
  saved = json.loads((tmp_path / "000000000785_keypoints.json").read_text())
  assert saved == json.loads(json.dumps(result))
  png = Image.open(result["overlay"])
  assert png.format == "PNG" and png.size == (640, 425)
  assert not (np.asarray(png.convert("RGB")) == np.asarray(Image.open(image))).all()


def test_missing_image_is_a_data_error(config, tmp_path):
  with pytest.raises(errors.DataError, match="image file not found"):
    predict.predict(config, str(tmp_path / "nope.jpg"))


def test_unknown_keypoint_name_lists_the_known_ones(shared_data, config):
  with pytest.raises(errors.ConfigError, match="unknown keypoint 'elbow'.*left elbow"):
    predict.predict(config, str(shared_data / "coco" / "000000000785.jpg"), keypoints=["elbow"])


def test_bad_box_is_a_config_error():
  for text in ("1,2,3", "a,b,c,d", "0,0,-5,10"):
    with pytest.raises(errors.ConfigError, match="--box"):
      predict.parse_box(text)


def test_cli_reports_a_missing_image_clearly(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "kptjax.predict", "--config", "configs/tiny.py",
       "--image", str(tmp_path / "missing.jpg"), "--out", str(tmp_path)],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "missing.jpg" in proc.stderr and "image file not found" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_attention_heatmap_and_overlay():
  crop = np.full((32, 32, 3), 100, np.uint8)
  attn = np.zeros(16)
  attn[5] = 1.0                                        # patch (row 1, col 1) of a 4x4 grid
  heat = viz.attention_heatmap(attn, (4, 4), crop, alpha=0.6)
  assert heat.shape == (32, 32, 3) and heat.dtype == np.uint8
  hot, cold = heat[12, 12].astype(int), heat[28, 28].astype(int)
  assert hot[0] > cold[0] and cold[2] > hot[2]         # jet: red where attention is high
  drawn = viz.draw_keypoints(crop, np.array([[5.0, 5.0], [20.0, 20.0]]), [(0, 1)],
                             ["left wrist", "right wrist"])
  assert (drawn != crop).any() and drawn.shape == crop.shape


def test_unanswered_keypoints_are_listed_not_drawn(shared_data, config, model_params, tmp_path,
                                                   monkeypatch, capsys):
  """Only the first query parses: the others are listed as missing (JSON and stdout's
  JSON), have no coordinates, and nothing is drawn at the crop centre (where they were
  once placed, all on one dot)."""
  from kptjax.inference import parsing
  calls = []

  def scorer(tokens, probs, token_strs, eos_id, count):
    calls.append(1)
    if len(calls) == 1:
      return parsing.ParsedAnswer(np.full(count, 0.25, np.float32), 0.9, True, "[0.25,0.25]")
    return parsing.ParsedAnswer(np.zeros(count, np.float32), 0.0, False, "no idea")
  monkeypatch.setattr(parsing, "score_answer", scorer)
  image = shared_data / "coco" / "000000000785.jpg"
  result = predict.predict(config, str(image), box=predict.parse_box("280,44,218,346"),
                           keypoints=["nose", "left wrist", "right ankle"],
                           out_dir=str(tmp_path), model_params=model_params,
                           tokenizer=tok_lib.load_tokenizer(""))
  assert result["missing"] == ["left wrist", "right ankle"]
  first, *rest = result["keypoints"]
  assert first["parsed"] and np.isfinite([first["x"], first["y"]]).all()
  assert all(k["x"] is None and k["y"] is None and not k["parsed"] and k["score"] == 0
             for k in rest)
  saved = json.loads((tmp_path / "000000000785_keypoints.json").read_text())
  assert saved["missing"] == result["missing"]
  drawn = np.asarray(Image.open(result["overlay"]).convert("RGB")).astype(int)
  original = np.asarray(Image.open(image).convert("RGB")).astype(int)
  cx, cy = 280 + 218 / 2, 44 + 346 / 2                 # the crop centre in the image
  patch = np.s_[int(cy) - 6:int(cy) + 7, int(cx) - 6:int(cx) + 7]
  np.testing.assert_array_equal(drawn[patch], original[patch])

