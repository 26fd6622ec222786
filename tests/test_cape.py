"""Category-agnostic protocols on a small MP-100-style file the test writes: disjoint
category splits as five file sets, seeded 1-/5-shot supports, per-category PCK@0.2
against a hand count, AP-10K family filtering."""

import json

import numpy as np
import pytest

from configs import tiny
from kptjax.data import cape, tokenizer as tok_lib
from kptjax.data.sources import ap10k, read_dataset, read_mp100
from kptjax.errors import DataError
from kptjax.evaluation import metrics, protocols
from kptjax.inference import decode
from kptjax.inference.prompts import build_prompts


def _mp100_file(path, num_categories=10, per_category=6):
  """num_categories categories (3 + c % 3 keypoints each), per_category instances each,
  one instance per image."""
  images, anns, cats = [], [], []
  for c in range(1, num_categories + 1):
    k = 3 + c % 3
    cats.append({"id": c, "name": f"thing_{c}", "supercategory": f"fam{c % 2}",
                 "keypoints": [f"point_{j}" for j in range(k)]})
    for i in range(per_category):
      image_id = c * 100 + i
      images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": 64,
                     "height": 64})
      kp = []
      for j in range(k):
        kp += [10 + j, 20 + i, 0 if (i == 1 and j == 0) else 2]
      anns.append({"id": image_id, "image_id": image_id, "category_id": c,
                   "bbox": [5, 5, 40, 40], "keypoints": kp})
  path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
  return path


def test_category_splits_are_disjoint_and_cover_each_category_once_as_test():
  splits = cape.category_splits(range(100), seed=3)
  assert len(splits) == 5
  for s in splits:
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (70, 10, 20)
    assert not set(s["train"]) & set(s["test"]) and not set(s["train"]) & set(s["val"])
    assert not set(s["val"]) & set(s["test"])
  tests = [c for s in splits for c in s["test"]]
  assert sorted(tests) == list(range(100))          # each category tested exactly once
  assert cape.category_splits(range(100), seed=3) == splits
  assert cape.category_splits(range(100), seed=4) != splits


def test_split_files_hold_disjoint_categories(tmp_path):
  ann = _mp100_file(tmp_path / "all.json")
  splits = cape.write_split_files(ann, tmp_path / "annotations", num_val=1, num_test=2)
  for k in range(1, 6):
    cats = {}
    for part in cape.SPLIT_PARTS:
      records = read_mp100(tmp_path / "annotations" / cape.split_file_name(k, part), tmp_path,
                           check_images=False)
      cats[part] = {r.spec for r in records}
      assert len(records) == 6 * len(splits[k - 1][part])
    assert (len(cats["train"]), len(cats["val"]), len(cats["test"])) == (7, 1, 2)
    assert not cats["train"] & cats["test"] and not cats["val"] & (cats["train"] | cats["test"])


@pytest.mark.parametrize("shots", [1, 5])
def test_supports_are_seeded_and_from_the_same_category(tmp_path, shots):
  records = read_mp100(_mp100_file(tmp_path / "all.json"), tmp_path, check_images=False)
  first = cape.sample_supports(records, shots, seed=7)
  assert first == cape.sample_supports(records, shots, seed=7)
  assert first != cape.sample_supports(records, shots, seed=8)
  # A query's supports do not depend on which other queries are drawn.
  assert cape.sample_supports(records, shots, seed=7, queries=[13]) == [first[13]]
  for q, sup in first:
    assert len(sup) == shots and len(set(sup)) == shots      # 5 others exist: no repeats
    assert all(records[s].spec == records[q].spec for s in sup)
    assert all(records[s].image_id != records[q].image_id for s in sup)


def test_support_keypoint_mask_needs_a_labeled_support(tmp_path):
  records = read_mp100(_mp100_file(tmp_path / "all.json"), tmp_path, check_images=False)
  query, unlabeled_support, other = records[0], records[1], records[2]   # category 1
  assert cape.support_keypoint_mask(query, [unlabeled_support]).tolist() == [False, True, True, True]
  assert cape.support_keypoint_mask(query, [unlabeled_support, other]).all()


def test_category_pck_per_instance_by_hand():
  """MP-100's PCK averages each instance's PCK (POMNet / CapeFormer ``_report_metric``);
  a distance of exactly t is a miss (mmpose's keypoint_pck_accuracy: d < t)."""
  # Box 100 x 50 -> normalizer 100 -> threshold 20 px.
  gt = np.zeros((5, 2, 2))
  pred = gt.copy()
  pred[0] = [(19.0, 0.0), (0.0, 21.0)]   # a: 1 of 2
  pred[1] = [(12.0, 16.0), (50.0, 50.0)]  # a: distance 20 -> miss; 2nd not visible: 0 of 1
  pred[2] = [(30.0, 0.0), (1.0, 1.0)]    # b: 1st not visible; 1 of 1
  pred[3] = [(1.0, 0.0), (0.0, 2.0)]     # b: 2 of 2
  pred[4] = [(0.0, 5.0), (90.0, 0.0)]    # a: 1 of 1 (2nd not visible)
  visible = np.array([[1, 1], [1, 0], [0, 1], [1, 1], [1, 0]], bool)
  boxes = np.tile([0.0, 0.0, 100.0, 50.0], (5, 1))
  out = metrics.category_pck(pred, gt, visible, boxes, ["a", "a", "b", "b", "a"], 0.2)
  per_instance = [0.5, 0.0, 1.0, 1.0, 1.0]
  assert out["PCK@0.2"] == pytest.approx(np.mean(per_instance))              # 0.7
  assert out["PCK@0.2(pooled)"] == pytest.approx(5 / 7)                      # keypoints
  assert out["per_category"] == {"a": pytest.approx(0.5), "b": 1.0}
  assert out["PCK@0.2(category_mean)"] == pytest.approx(0.75)
  assert out["count"] == {"a": 3, "b": 2} and out["keypoints"] == 7
  # A missing answer is a miss, whatever its value; non-finite unmarked is refused.
  pred[3, 1] = np.nan
  with pytest.raises(DataError, match="pred"):
    metrics.category_pck(pred, gt, visible, boxes, ["a", "a", "b", "b", "a"], 0.2)
  missing = np.zeros((5, 2), bool)
  missing[3, 1] = True
  out = metrics.category_pck(pred, gt, visible, boxes, ["a", "a", "b", "b", "a"], 0.2,
                             missing=missing)
  assert out["PCK@0.2"] == pytest.approx(np.mean([0.5, 0.0, 1.0, 0.5, 1.0]))
  assert out["missing"] == 1


def test_ap10k_families(tmp_path):
  ann = _mp100_file(tmp_path / "all.json")        # supercategory fam0 / fam1 by parity
  data = json.loads(ann.read_text())
  for a in data["annotations"]:                   # AP-10K files have 17 keypoints each
    a["keypoints"] = (a["keypoints"] + [0, 0, 0] * 17)[:51]
  ann.write_text(json.dumps(data))
  assert ap10k.family_category_ids(ann, "fam1") == [1, 3, 5, 7, 9]
  assert ap10k.family_category_ids(ann, "FAM0|fam1") == list(range(1, 11))
  with pytest.raises(DataError, match="Felidae"):
    ap10k.family_category_ids(ann, "Felidae")
  train = read_dataset("ap10k_family", ann, tmp_path, families="fam1", check_images=False)
  test = read_dataset("ap10k_family", ann, tmp_path, families="fam0", check_images=False)
  assert len(train) == len(test) == 30
  assert {r.image_id // 100 for r in train}.isdisjoint({r.image_id // 100 for r in test})


def test_capellm_prompts_decode_with_the_shared_prefix_as_by_full_forwards(model_params):
  """CapeLLM's template (<s> + image tokens + newline, then the keypoint's question):
  the shared-prefix engine gives the tokens and scores of the per-row path and of
  greedy decoding by full forwards (no cache)."""
  model, params = model_params
  config = tiny.get_config().unlock()
  config.data.template = "capellm"
  tokenizer = tok_lib.load_tokenizer("")
  names, descriptions = ["left eye", "tail tip"], ["The left eye.", None]
  prompts = build_prompts(tokenizer, config.lock(), names, descriptions,
                          subject="animal", pad_id=tokenizer.eos_token_id)
  decoder = decode.Decoder(model, params, prompts, eos_id=tokenizer.eos_token_id,
                           max_new_tokens=6)
  images = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
  tokens, probs, lengths = decoder.shared(images)
  rows = decoder.rows(images)
  np.testing.assert_array_equal(tokens, rows[0])
  np.testing.assert_array_equal(lengths, rows[2])
  np.testing.assert_allclose(probs, rows[1], atol=1e-5)
  full, full_len = prompts.full_rows()
  ref_tokens, ref_probs = decode.reference_greedy(
      model, params, np.repeat(images, 2, 0), np.tile(full, (2, 1)), np.tile(full_len, 2), 6,
      tokenizer.eos_token_id)
  np.testing.assert_array_equal(tokens.reshape(4, -1), ref_tokens)
  np.testing.assert_allclose(probs.reshape(4, -1), ref_probs, atol=1e-5)
  assert len(np.unique(ref_tokens)) > 2


def test_metrics_protocol_record_names_the_split_padding_and_head_boxes(tmp_path, shared_data):
  """metrics.json['protocol'] (evaluation.protocols.protocol_record): seeded split files
  say so with their seed, other files say 'files'; PCKh says whether head boxes existed."""
  config = tiny.get_config()
  with config.unlocked():
    config.data.heldout_keypoints = "nose"
  ann = _mp100_file(tmp_path / "all.json")
  cape.write_split_files(ann, tmp_path / "annotations", num_val=1, num_test=2, seed=7)
  test = read_mp100(tmp_path / "annotations" / cape.split_file_name(2, "test"), tmp_path,
                    check_images=False)
  mp = protocols.PROTOCOLS["mp100"]
  rec = protocols.protocol_record(mp, test, config, task="visual")
  assert rec["split"]["split"] == "seeded" and rec["split"]["seed"] == 7
  assert rec["split"]["file"] == cape.split_file_name(2, "test")
  assert rec["heldout_keypoints"] == "nose" and rec["padding"] == config.data.padding
  other = read_mp100(ann, tmp_path, check_images=False)
  assert protocols.protocol_record(mp, other, config, task="visual")["split"]["split"] == "files"
  d = shared_data / "mpii"
  mpii = read_dataset("mpii", json_file=str(d / "test_mpii.json"), image_root=str(d))
  rec = protocols.protocol_record(protocols.PROTOCOLS["mpii"], mpii, config, task="keypoints",
                                  pckh_variant="locllm", mpii_box_pck=True)
  assert rec["head_boxes"] is False and rec["mpii_box_pck"] is True
  assert rec["pckh_variant"] == "locllm" and "split" not in rec
