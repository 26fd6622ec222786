"""Grain pipelines: static shapes, same seed -> same batches, restore -> same next batch,
two processes cover the data once (train epoch and eval), eval metadata, real sources."""

import json

import numpy as np
import pytest

from configs import tiny
from kptjax.data import pipeline
from kptjax.data.tokenizer import load_tokenizer
from kptjax.errors import ConfigError


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  c = tiny.get_config()
  root = str(tmp_path_factory.mktemp("synthetic"))
  c.data.train.path = c.data.eval.path = root
  c.data.train.num_images, c.data.eval.num_images = 8, 5
  c.train.batch_size = 4
  return c


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer("")


@pytest.fixture(scope="module")
def train_records(config):
  return pipeline.load_records(config, "train")


@pytest.fixture(scope="module")
def eval_records(config):
  return pipeline.load_records(config, "eval")


def _take(ds, n, state=None):
  it = iter(ds)
  if state is not None:
    it.set_state(state)
  return [next(it) for _ in range(n)], it


def _equal(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_batch_shapes_and_masks(config, tok, train_records):
  (batch,), _ = _take(pipeline.make_train_dataset(config, tok, records=train_records), 1)
  t, s = config.data.max_len, config.model.vit.image_size
  assert batch["image"].shape == (4, s, s, 3) and batch["image"].dtype == np.float32
  for key, dtype in (("tokens", np.int32), ("targets", np.int32), ("loss_mask", np.float32),
                     ("input_mask", np.bool_)):
    assert batch[key].shape == (4, t) and batch[key].dtype == dtype, key
  assert np.all(batch["input_mask"][batch["loss_mask"] > 0])      # loss only on real tokens
  assert np.all((batch["tokens"] == config.model.image_token_id).sum(1) == (s // 8) ** 2)
  assert np.all(batch["loss_mask"].sum(1) > 0)
  assert abs(float(batch["image"].mean())) < 1.5                  # normalized pixels


def test_same_seed_same_batches(config, tok, train_records):
  a, _ = _take(pipeline.make_train_dataset(config, tok, records=train_records), 3)
  b, _ = _take(pipeline.make_train_dataset(config, tok, records=train_records), 3)
  assert all(_equal(x, y) for x, y in zip(a, b))
  assert not _equal(a[0], a[1])
  other = config.copy_and_resolve_references()
  other.seed = 1
  c, _ = _take(pipeline.make_train_dataset(other, tok, records=train_records), 1)
  assert not _equal(a[0], c[0])


def test_restore_gives_the_same_next_batch(config, tok, train_records):
  ds = pipeline.make_train_dataset(config, tok, records=train_records)
  _, it = _take(ds, 3)          # into the second epoch (8 records / 4 per batch)
  state = it.get_state()
  expected = next(it)
  saved = json.loads(json.dumps(state))                 # what a checkpoint stores
  (restored,), _ = _take(pipeline.make_train_dataset(config, tok, records=train_records), 1,
                         state=saved)
  assert _equal(restored, expected)


def _no_augment(config):
  c = config.copy_and_resolve_references()
  c.data.augment.update(dict(scale_sigma=0.0, rotation_prob=0.0, flip_prob=0.0))
  c.train.batch_size = 2
  return c


def test_two_processes_cover_the_train_data_once(config, tok, train_records):
  c = _no_augment(config)
  crops = pipeline.make_eval_dataset(c, records=train_records)
  reference = [crops[i]["image"] for i in range(len(train_records))]
  seen = []
  for p in range(2):
    n = len(range(p, len(train_records), 2))            # this process's first epoch
    batches, _ = _take(pipeline.make_train_dataset(c, tok, records=train_records,
                                                   process_index=p, process_count=2), n)
    for b in batches:
      assert b["image"].shape[0] == 1                    # per-process batch = 2 // 2
      seen += [i for i, ref in enumerate(reference) if np.allclose(ref, b["image"][0])]
  assert sorted(seen) == list(range(len(train_records)))


def test_eval_every_person_once(config, eval_records):
  n = len(eval_records)
  single = pipeline.make_eval_dataset(config, records=eval_records)
  assert [int(single[i]["index"]) for i in range(len(single))] == list(range(n))
  parts = [pipeline.make_eval_dataset(config, records=eval_records, process_index=p,
                                      process_count=2) for p in range(2)]
  indices = [int(ds[i]["index"]) for ds in parts for i in range(len(ds))]
  assert sorted(indices) == list(range(n))
  batched = [pipeline.make_eval_dataset(config, records=eval_records, process_index=p,
                                        process_count=2, batch_size=2) for p in range(2)]
  assert len(batched[0]) == len(batched[1])              # same number of steps everywhere
  valid = [int(i) for ds in batched for b in ds for i in b["index"][b["valid"]]]
  assert sorted(valid) == list(range(n))
  per_process = -(-(-(-n // 2)) // 2) * 2                  # ceil(ceil(n / 2) / 2) * 2
  assert all(sum(b["valid"].size for b in ds) == per_process for ds in batched)


def test_eval_element_maps_back_to_the_image(config, eval_records):
  ds = pipeline.make_eval_dataset(config, records=eval_records)
  el, rec = ds[0], eval_records[0]
  np.testing.assert_array_equal(el["keypoints"], rec.keypoints)
  np.testing.assert_array_equal(el["box"], rec.box)
  assert el["image_id"] == rec.image_id and el["ann_id"] == rec.ann_id and el["valid"]
  s = config.model.vit.image_size
  center = el["affine_inv"] @ np.array([s / 2, s / 2, 1.0])   # HRNet: crop center = s/2
  np.testing.assert_allclose(center, rec.box[:2] + rec.box[2:] / 2, atol=1e-3)


def test_real_source_and_groups(config, tok, shared_data):
  c = config.copy_and_resolve_references()
  c.data.train.source = "coco"
  c.data.train.ann_file = str(shared_data / "coco" / "test_coco.json")
  c.data.train.image_root = str(shared_data / "coco")
  records = pipeline.load_records(c, "train")
  assert len(records) == 12                               # 14 persons, 2 without keypoints
  c.data.train.ann_file = ""
  c.data.train.path = ""
  with pytest.raises(ConfigError, match="ann_file"):
    pipeline.load_records(c, "train")
  items = pipeline._items(records, 4, seed=0)
  assert len(items) == 12 * 5                             # 17 keypoints -> 5 groups of 4
  ids = {i for index, group in items if index == 0 for i in group}
  assert ids == set(range(17)) and all(len(g) == 4 for _, g in items)
  c.data.group_size, c.data.template, c.data.use_descriptions = 4, "capellm", False
  c.data.train.ann_file = str(shared_data / "coco" / "test_coco.json")
  (batch,), _ = _take(pipeline.make_train_dataset(c, tok, records=records), 1)
  assert np.all(batch["loss_mask"].sum(1) <= 4 * 14)      # at most 4 rounds per item


def test_curriculum_stages_draw_from_the_first_items():
  items = tuple(range(10))
  cur = pipeline.CurriculumItems(items, ((2, 3), (5, 2)), batch=4, seed=0)
  tagged = [cur[i] for i in range(40)]
  assert [t for _, t in tagged] == [True] * 20 + [False] * 20
  stage1 = [x for x, _ in tagged[:12]]                 # 3 steps of 4
  stage2 = [x for x, _ in tagged[12:20]]               # 2 steps of 4
  rest = [x for x, _ in tagged[20:]]                   # then every item, epoch by epoch
  assert set(stage1) == {0, 1} and stage1.count(0) == 6
  assert sorted(stage2[:5]) == list(range(5)) and set(stage2) <= set(range(5))
  assert sorted(rest[:10]) == sorted(rest[10:]) == list(items) and rest[:10] != rest[10:]
  again = pipeline.CurriculumItems(items, ((2, 3), (5, 2)), batch=4, seed=0)
  assert [again[i] for i in range(40)] == tagged
  assert pipeline.parse_curriculum("64:500, 512:300") == ((64, 500), (512, 300))
  for bad in ("64", "a:b", "0:5"):
    with pytest.raises(ConfigError, match="data.curriculum"):
      pipeline.parse_curriculum(bad)


def test_curriculum_stream_repeats_the_first_images_unaugmented(config, tok, train_records):
  c = config.copy_and_resolve_references()       # augmentation on, as in training
  c.train.batch_size = 2
  c.data.curriculum = "1:2"
  first = pipeline.make_eval_dataset(c, records=train_records)[0]["image"]
  batches, _ = _take(pipeline.make_train_dataset(c, tok, records=train_records), 3)
  assert all(np.allclose(img, first) for b in batches[:2] for img in b["image"])
  assert not any(np.allclose(img, first) for img in batches[2]["image"])
  c.data.curriculum_augment = True
  batches, _ = _take(pipeline.make_train_dataset(c, tok, records=train_records), 2)
  assert not all(np.allclose(img, first) for b in batches for img in b["image"])
