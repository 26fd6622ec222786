"""Training elements (kptjax/data/tasks): the registry picks captions by record type and
the conversations by model variant; KptLLM task conversations: golden strings of the three tasks (decimal and <keypoint>
answers), loss masks on answers and end-of-turn only, per-round prompt / regression slots,
task mixing."""

import numpy as np
import pytest

from configs import tiny
from kptjax.data import conversation as conv, tasks
from kptjax.data.sources import CaptionRecord, PersonRecord
from kptjax.data.tasks import kptllm as kpt_tasks
from kptjax.data.tokenizer import load_tokenizer
from kptjax.errors import ConfigError
from kptjax.keypoints import get_spec

N_IMAGE = 2
PROMPT, KEYPOINT = 103, 104          # tiny tokenizer: <loc_98>, <loc_99> (configs/tiny.py)


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer("")


def _enc(tok, **kw):
  cfg = dict(template="locllm", coord_format="decimal2d", use_descriptions=True, rounds=2,
             max_len=0, loc_bins=100)
  cfg.update(kw)
  return kpt_tasks.TaskEncoder(tok, cfg, N_IMAGE, prompt_token_id=PROMPT,
                               keypoint_token_id=KEYPOINT)


def _keypoints():
  """coco17 in a 100 px crop: only the nose (0) and the left eye (1) are labeled."""
  kp = np.zeros((17, 3), np.float32)
  kp[0] = (41.2, 73.3, 2)
  kp[1] = (10.0, 20.0, 2)
  return kp


def _text(tok, out):
  n = int(out["input_mask"].sum())
  return tok.decode([int(i) for i in out["tokens"][:n]], skip_special_tokens=False)


PREFIX = "<s>Image: " + "<image>" * N_IMAGE + "\n"
SEM_Q = ("Keypoint prompt: <loc_98>\nQuestion: What is the keypoint of this person marked by "
         "the prompt? Please describe it.\nAnswer: ")
VIS_Q = ("Keypoint prompt: <loc_98>\nQuestion: Where is the keypoint marked by the prompt in "
         "this image? Please describe it, then provide its coordinates.\nAnswer: ")
TXT_Q = ("Keypoint: {d}\nQuestion: Where is the {n} of this person in this image? Please "
         "provide its coordinates.\nAnswer: ")


@pytest.mark.parametrize("fmt", ["decimal2d", "keypoint_token"])
def test_golden_strings(tok, fmt):
  spec = get_spec("coco17")
  nose, eye = spec.descriptions[0], spec.descriptions[1]
  enc = _enc(tok, coord_format=fmt)
  coords = ("[0.412,0.733]", "[0.100,0.200]") if fmt == "decimal2d" else ("<loc_99>",) * 2
  kp = _keypoints()
  sem = enc.encode_task("semantic", kp, 100, spec, None)
  assert _text(tok, sem) == PREFIX + SEM_Q + nose + "</s>" + SEM_Q + eye + "</s>"
  vis = enc.encode_task("visual", kp, 100, spec, None)
  assert _text(tok, vis) == (PREFIX + VIS_Q + nose + " Coordinates: " + coords[0] + "</s>"
                             + VIS_Q + eye + " Coordinates: " + coords[1] + "</s>")
  txt = enc.encode_task("textual", kp, 100, spec, None)
  assert _text(tok, txt) == (PREFIX + TXT_Q.format(d=nose, n="nose") + coords[0] + "</s>"
                             + TXT_Q.format(d=eye, n="left eye") + coords[1] + "</s>")
  if fmt == "decimal2d":   # the textual task with decimals is LocLLM's conversation
    locllm = conv.encode_training_example(kp, 100, spec, tok, dict(enc.cfg), N_IMAGE, None)
    np.testing.assert_array_equal(locllm["tokens"], txt["tokens"])


@pytest.mark.parametrize("task", kpt_tasks.TASKS)
def test_loss_mask_covers_only_answers(tok, task):
  spec = get_spec("coco17")
  max_len = 300 if task == "visual+textual" else 200   # its rounds carry the description
  enc = _enc(tok, coord_format="keypoint_token", max_len=max_len)
  out = enc.encode_task(task, _keypoints(), 100, spec, np.random.default_rng(0))
  tokens, targets, mask = out["tokens"], out["targets"], out["loss_mask"]
  n = int(out["input_mask"].sum())
  assert tokens.shape == (max_len,) and np.array_equal(targets[:n - 1], tokens[1:n])
  masked = tok.decode([int(t) for t in targets[mask > 0]], skip_special_tokens=False)
  answers = {"semantic": "{0}</s>{1}</s>",
             "visual": "{0} Coordinates: <loc_99></s>{1} Coordinates: <loc_99></s>",
             "textual": "<loc_99></s><loc_99></s>"}
  answers["visual+textual"] = answers["visual"]
  answers = answers[task]
  order = [int(i) for i in out["prompt_index"]]
  assert sorted(order) == [0, 1]
  assert masked == answers.format(*(spec.descriptions[i] for i in order))
  assert np.all(mask[n - 1:] == 0)                        # nothing past the end
  # Per-round slots: one <prompt> per semantic / visual round, one <keypoint> target per
  # detection round, in order.
  assert int(np.sum(tokens == PROMPT)) == int(out["prompt_mask"].sum()) == (
      0 if task == "textual" else 2)
  assert int(np.sum(tokens == KEYPOINT)) == int(out["kpt_mask"].sum()) == (
      0 if task == "semantic" else 2)
  xy = {0: (0.412, 0.733), 1: (0.1, 0.2)}
  np.testing.assert_allclose(out["kpt_xy"], [xy[i] for i in order], atol=1e-6)


def test_prompt_valid_limits_prompted_keypoints(tok):
  spec = get_spec("coco17")
  valid = np.zeros(17, bool)
  valid[1] = True                                     # the support labels only the left eye
  out = _enc(tok).encode_task("visual", _keypoints(), 100, spec, None, prompt_valid=valid)
  assert out["num_rounds"] == 1 and out["prompt_index"].tolist() == [1, -1]
  txt = _enc(tok).encode_task("textual", _keypoints(), 100, spec, None, prompt_valid=valid)
  assert txt["num_rounds"] == 2                       # text prompts need no support


def test_task_mixing():
  names, probs = kpt_tasks.parse_tasks("visual:3,textual")
  assert names == ("visual", "textual") and probs.tolist() == [0.75, 0.25]
  assert kpt_tasks.parse_tasks("")[0] == ()
  with pytest.raises(ConfigError, match="unknown task"):
    kpt_tasks.parse_tasks("pose:1")
  with pytest.raises(ConfigError, match="location token"):
    kpt_tasks.TaskEncoder(load_tokenizer(""), dict(coord_format="loc_tokens", loc_bins=100), 1,
                          prompt_token_id=PROMPT, keypoint_token_id=KEYPOINT)
  with pytest.raises(ConfigError, match="keypoint_token_id"):
    kpt_tasks.TaskEncoder(load_tokenizer(""), dict(coord_format="keypoint_token"), 1,
                          prompt_token_id=PROMPT)


def test_element_builder_by_record_type_and_variant(tok):
  config = tiny.get_config()
  person = PersonRecord(image_path="x.jpg", image_size=(64, 64), box=np.array([0, 0, 8, 8.]),
                        keypoints=np.zeros((17, 3), np.float32), spec="coco17")
  assert isinstance(tasks.element_for(config, tok, [person]), tasks.RoundsElement)
  caption = CaptionRecord(image_path="x.jpg", caption="a cat")
  assert isinstance(tasks.element_for(config, tok, [caption]), tasks.CaptionElement)
  with config.unlocked():
    config.model.kpt.enabled = True
    config.data.tasks = "visual:1"
  assert isinstance(tasks.element_for(config, tok, [person]), tasks.KptTaskElement)


VT_Q = ("Keypoint prompt: <loc_98>\nKeypoint: {d}\nQuestion: Where is the keypoint marked by "
        "the prompt in this image? Please describe it, then provide its coordinates.\n"
        "Answer: ")


def test_visual_plus_textual_and_detect_only_strings(tok):
  """KptLLM Table 7 (prompt and description together) and Table 5 (no identify step)."""
  spec = get_spec("coco17")
  nose = spec.descriptions[0]
  both = _enc(tok).encode_task("visual+textual", _keypoints(), 100, spec, None,
                               keypoint_ids=[0])
  assert _text(tok, both) == (PREFIX + VT_Q.format(d=nose) + nose
                              + " Coordinates: [0.412,0.733]</s>")
  assert both["prompt_mask"][0] == 1 and both["prompt_index"][0] == 0
  direct = _enc(tok, identify_then_detect=False)
  vis = direct.encode_task("visual", _keypoints(), 100, spec, None, keypoint_ids=[0])
  assert _text(tok, vis) == (PREFIX + VIS_Q.replace("Please describe it, then provide",
                                                    "Please provide") + "[0.412,0.733]</s>")
  vt = direct.encode_task("visual+textual", _keypoints(), 100, spec, None, keypoint_ids=[0])
  assert _text(tok, vt) == (PREFIX + VT_Q.format(d=nose).replace(
      "Please describe it, then provide", "Please provide") + "[0.412,0.733]</s>")
  # The semantic and textual tasks are the same either way.
  for task in ("semantic", "textual"):
    assert _text(tok, direct.encode_task(task, _keypoints(), 100, spec, None)) == \
        _text(tok, _enc(tok).encode_task(task, _keypoints(), 100, spec, None))


@pytest.mark.parametrize("task", ["visual", "textual", "visual+textual"])
def test_held_out_keypoints_are_never_asked(tok, task):
  spec = get_spec("coco17")
  enc = _enc(tok, rounds=17, heldout_keypoints="nose")
  out = enc.encode_task(task, _keypoints(), 100, spec, np.random.default_rng(0))
  assert list(out["prompt_index"][:int(out["num_rounds"])]) == [1]   # the left eye only
  with pytest.raises(ConfigError, match="heldout_keypoints"):
    _enc(tok, heldout_keypoints="tail tip").encode_task(task, _keypoints(), 100, spec, None)
