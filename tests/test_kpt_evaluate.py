"""MP-100 protocol evaluation of KptLLM on the synthetic objects: the questions asked
(keypoints labeled in the query and a support; supports seeded), answers mapped back to
image pixels through the crop, PCK per category; a real tiny model runs end to end."""

import jax
import numpy as np
import pytest

from configs import tiny
from kptjax import kpt_evaluate
from kptjax.data import cape, pipeline
from kptjax.data.tokenizer import load_tokenizer
from kptjax.inference import kpt_decode
from kptjax.models import kptllm


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  c = tiny.get_config().unlock()
  c.model.kpt.enabled = True
  c.model.remat_policy = "none"
  c.data.eval.update(source="synthetic_objects", path=str(tmp_path_factory.mktemp("o")),
                     num_images=6, split="val")
  c.data.update(coord_format="keypoint_token", max_len=96)
  config = c.lock()
  return config, pipeline.load_records(config, "eval"), load_tokenizer("")


def test_questions_follow_the_support_protocol(setup):
  config, records, _ = setup
  questions = list(kpt_evaluate._questions(config, records, "visual", 1, seed=3))
  draws = cape.sample_supports(records, 1, seed=3)
  expected = sum(int(cape.support_keypoint_mask(records[q], [records[s] for s in sup]).sum())
                 for q, sup in draws)
  assert len(questions) == expected > 0
  q = questions[0]
  assert q["support_image"].shape == (1, 32, 32, 3) and q["support_mask"].tolist() == [1.0]
  assert np.all((q["support_xy"] >= 0) & (q["support_xy"] <= 1))
  again = list(kpt_evaluate._questions(config, records, "visual", 1, seed=3))
  np.testing.assert_array_equal(q["support_xy"], again[0]["support_xy"])


class _FakeKptLLM:
  """Stands in for KptLLM's prompt path (``embed_prompts`` under ``apply``)."""

  def embed_prompts(self):
    pass

  def apply(self, variables, images, xy, mask, method):
    return np.zeros((images.shape[0], 1, 4), np.float32)


def test_visual_answers_map_back_like_textual_ones(setup, monkeypatch):
  """The crop centre scores the same in both tasks on the keypoints both ask."""
  config, records, tok = setup

  def centre(model, params, images, tokens, mask, **kw):
    return np.full((images.shape[0], 2), 0.5, np.float32), None
  monkeypatch.setattr(kpt_decode, "generate_keypoints", centre)
  monkeypatch.setattr(jax, "jit", lambda f: f)
  vis, txt = (kpt_evaluate.evaluate_cape(config, _FakeKptLLM(), None, tok, records, task=t,
                                         rows_per_batch=4, threshold=0.5)
              for t in ("visual", "textual"))
  assert vis["questions"] == txt["questions"]          # synthetic objects: all labeled
  assert vis["per_category"] == txt["per_category"] and 0 < vis["PCK@0.5"] < 1


@pytest.mark.parametrize("coord_format", ["keypoint_token", "decimal2d"])
def test_answers_map_back_to_image_pixels(setup, monkeypatch, coord_format):
  """A model answering the crop centre (by the head, or as LocLLM's text) is scored at
  the box centre of every instance."""
  config, records, tok = setup
  config = config.copy_and_resolve_references()       # the fixture's config stays as is
  config.data.coord_format = coord_format
  text = tok.encode("[0.500,0.500]", add_special_tokens=False) + [tok.eos_token_id, 7]

  def centre(model, params, images, tokens, mask, force_keypoint=True, **kw):
    assert force_keypoint == (coord_format == "keypoint_token")
    xy = np.full((images.shape[0], 2), 0.5 if force_keypoint else 0.0, np.float32)
    return xy, np.tile(np.asarray(text, np.int32), (images.shape[0], 1))
  monkeypatch.setattr(kpt_decode, "generate_keypoints", centre)
  out = kpt_evaluate.evaluate_cape(config, None, None, tok, records, task="textual",
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


def test_tiny_model_end_to_end(setup):
  config, records, tok = setup
  params = kptllm.init_params(config.model, jax.random.key(0, impl="unsafe_rbg"))
  out = kpt_evaluate.evaluate_cape(config, kptllm.KptLLM(config.model), params, tok,
                                   records[:3], task="visual", shots=1, rows_per_batch=8,
                                   max_new_tokens=1)
  assert out["questions"] > 0 and 0.0 <= out["PCK@0.2"] <= 1.0
  assert set(out["per_category"]) <= {r.category for r in records}


def test_semantic_accuracy_by_exact_description(setup, monkeypatch):
  """An oracle that always answers the square's top-left description is right exactly on
  the squares' top-left corners; prompts come from the query image itself."""
  config, records, tok = setup
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
    return None, np.tile(np.asarray(ids, np.int32), (images.shape[0], 1))
  monkeypatch.setattr(kpt_decode, "generate_keypoints", oracle)
  monkeypatch.setattr(jax, "jit", lambda f: f)
  out = kpt_evaluate.evaluate_semantic(config, Fake(), None, tok, records, rows_per_batch=4)
  squares = [r for r in records if r.category == "square"]
  assert out["questions"] == sum(r.num_keypoints for r in records)
  expected = len(squares) / out["questions"]
  assert out["accuracy"] == pytest.approx(expected)
  assert squares and out["per_category"]["square"] == pytest.approx(0.25)   # 1 of 4 corners
  assert all(x.shape[1:] == (1, 1, 2) for x in seen)


def test_run_writes_metrics_and_reads_them_back(setup, monkeypatch, tmp_path):
  config, _, _ = setup
  calls = []

  def fake_load(cfg, checkpoint="", step=None):
    calls.append(checkpoint)
    return cfg, None, None

  def centre(model, params, images, tokens, mask, **kw):
    return np.full((images.shape[0], 2), 0.5, np.float32), None
  monkeypatch.setattr(kpt_evaluate, "load_kpt_model", fake_load)
  monkeypatch.setattr(kpt_decode, "generate_keypoints", centre)
  first = kpt_evaluate.run(config, str(tmp_path), task="textual")
  assert (tmp_path / "metrics.json").exists() and first["task"] == "textual"
  again = kpt_evaluate.run(config, str(tmp_path), task="textual")
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
    out = np.zeros((images.shape[0], 2), np.float32)
    out[:len(truth)] = truth
    return out, None
  monkeypatch.setattr(kpt_decode, "generate_keypoints", oracle)
  out = kpt_evaluate.evaluate_cape(c, None, None, load_tokenizer(""), records, task="textual",
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
  tok = load_tokenizer("")
  garbage = tok.encode("no idea", add_special_tokens=False) + [tok.eos_token_id]

  def babble(model, params, images, tokens, mask, force_keypoint=True, **kw):
    assert not force_keypoint
    return None, np.tile(np.asarray(garbage, np.int32), (images.shape[0], 1))
  monkeypatch.setattr(kpt_decode, "generate_keypoints", babble)
  out = kpt_evaluate.evaluate_cape(c, None, None, tok, records, task="textual",
                                   rows_per_batch=16, coco_gt=str(folder / "test_ap10k.json"))
  assert out["AP"] == 0.0 and out["PCK@0.2"] == 0.0
  assert out["questions"] == 16 and out["parse_failures"] == 16
  assert out["missing_keypoints"] == 16 and out["parse_failure_rate"] == 1.0


def test_unreadable_query_image_is_missing_and_counted(setup, monkeypatch, tmp_path):
  """A corrupt query image: its questions are asked of nobody, scored as misses and
  counted; the others are answered (here: perfectly, by an oracle on the crop)."""
  import copy
  import dataclasses
  config, records, tok = setup
  broken = tmp_path / "broken.png"
  broken.write_bytes(b"not a png")
  records = copy.copy(records)                 # a Records list: its specs come along
  records[0] = dataclasses.replace(records[0], image_path=str(broken), image_bytes=None)
  asked = []

  def oracle(model, params, images, tokens, mask, **kw):
    asked.append(images.shape[0])
    return np.full((images.shape[0], 2), 0.5, np.float32), None
  monkeypatch.setattr(kpt_decode, "generate_keypoints", oracle)
  out = kpt_evaluate.evaluate_cape(config, None, None, tok, records, task="textual",
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
  tok = load_tokenizer("")
  junk = np.asarray(tok.encode("no idea", add_special_tokens=False) + [tok.eos_token_id],
                    np.int32)

  def babble(model, params, images, tokens, mask, force_keypoint=True, **kw):
    return None, np.tile(junk, (images.shape[0], 1))
  monkeypatch.setattr(kpt_decode, "generate_keypoints", babble)
  out = kpt_evaluate.evaluate_cape(c, None, None, tok, records, task="textual",
                                   rows_per_batch=8, coco_gt=str(folder / "test_ap10k.json"))
  assert out["questions"] == out["missing"] == 32
  assert out["PCK@0.2"] == 0.0 and out["AP"] == 0.0 and out["AR"] == 0.0
