"""Grain pipelines: static shapes, same seed -> same batches, restore -> same next batch,
two processes cover the data once (train epoch and eval), eval metadata, real sources,
an unreadable training image skipped and counted (deterministically, resumably) or, with
data.strict_images, raised; stage-1 captions and KptLLM's tasks with supports through the
same entry (the synthetic objects, MP-100 style: static shapes, tasks mixed in one run,
visual supports from other images of the same category with the prompted keypoint's
position, semantic supports = the query crop, deterministic by seed; an unreadable query
or support image skips the element, counted, or, strict, raises)."""

import dataclasses
import json
import os
import threading

import grain
import numpy as np
import pytest

from configs import tiny
from kptjax.data import pipeline
from kptjax.data.sources import read_llava_captions
from kptjax.data.tokenizer import load_tokenizer
from kptjax.errors import ConfigError, ImageError


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


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
def test_idle_read_threads_give_the_same_batches(config, tok, train_records):
  a, _ = _take(pipeline.make_train_dataset(config, tok, records=train_records), 3)
  idle = config.copy_and_resolve_references()
  idle.data.read_thread_priority = "idle"
  b, it = _take(pipeline.make_train_dataset(idle, tok, records=train_records), 3)
  assert all(_equal(x, y) for x, y in zip(a, b))
  policies = {os.sched_getscheduler(t.native_id) for t in threading.enumerate()
              if t is not threading.main_thread() and t.native_id}
  assert os.SCHED_IDLE in policies                      # grain's read threads, alive with it
  assert os.sched_getscheduler(0) != os.SCHED_IDLE       # the main thread is never lowered
  del it
  idle.data.read_thread_priority = "low"
  with pytest.raises(ConfigError, match="data.read_thread_priority='low'"):
    pipeline.make_train_dataset(idle, tok, records=train_records)


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
  items = pipeline.train_items(records, 4, seed=0)
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


# ------------------------------------------------------------------ unreadable images


def _rows(batches):
  return [{k: b[k][r] for k in ("image", "tokens", "loss_mask")}
          for b in batches for r in range(b["image"].shape[0])]


def _stream_items(config, n_items, count):
  """The first ``count`` item indices of the train stream (its shuffle, read directly)."""
  ds = grain.MapDataset.source(list(range(n_items))).shuffle(seed=int(config.seed)).repeat()
  return [ds[i] for i in range(count)]


def test_unreadable_training_image_is_skipped_counted_and_resumable(config, tok, train_records,
                                                                    tmp_path):
  bad = 3
  corrupt = tmp_path / "corrupt.png"
  corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
  records = list(train_records)
  records[bad] = dataclasses.replace(records[bad], image_path=str(corrupt))
  n_batches, batch = 7, config.train.batch_size
  batches, it = _take(pipeline.make_train_dataset(config, tok, records=records), n_batches)
  stream = _stream_items(config, len(records), 64)
  kept = [j for j, item in enumerate(stream) if item != bad][:n_batches * batch]
  # Each row says how many elements were dropped just before it; their sum is the number
  # of times the corrupt person came up before the last kept row.
  counts = np.concatenate([b["skipped_images"] for b in batches])
  assert counts.sum() == stream[:kept[-1]].count(bad) >= 3
  assert counts.tolist() == [kept[0]] + [b - a - 1 for a, b in zip(kept, kept[1:])]
  # The kept rows are the clean stream's elements at the same stream positions (the same
  # crops, augmentation and rounds): skipping moves nothing else.
  clean, _ = _take(pipeline.make_train_dataset(config, tok, records=train_records),
                   -(-(kept[-1] + 1) // batch))
  clean_rows = _rows(clean)
  for row, j in zip(_rows(batches), kept):
    assert all(np.array_equal(row[k], clean_rows[j][k]) for k in row)
  # Resumable: a restored iterator continues with the same batch.
  state = json.loads(json.dumps(it.get_state()))
  expected = next(it)
  (restored,), _ = _take(pipeline.make_train_dataset(config, tok, records=records), 1,
                         state=state)
  assert _equal(restored, expected)

  strict = config.copy_and_resolve_references()
  strict.data.strict_images = True
  with pytest.raises(ImageError, match="corrupt.png") as err:
    _take(pipeline.make_train_dataset(strict, tok, records=records), n_batches)
  assert err.value.path == str(corrupt)


def test_no_readable_training_image_is_an_error(config, tok, train_records, tmp_path):
  missing = [dataclasses.replace(r, image_path=str(tmp_path / f"gone{i}.jpg"))
             for i, r in enumerate(train_records)]
  with pytest.raises(ImageError, match=f"{len(missing)} training examples in a row"):
    _take(pipeline.make_train_dataset(config, tok, records=missing), 1)


def test_caption_pipeline_skips_an_unreadable_image(config, tok, shared_data, tmp_path):
  (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff truncated")
  for name in ("000000000785.jpg", "000000040083.jpg"):
    (tmp_path / name).write_bytes((shared_data / "coco" / name).read_bytes())
  images = ["000000000785.jpg", "bad.jpg", "000000040083.jpg"]
  (tmp_path / "chat.json").write_text(json.dumps(
      [{"id": str(i), "image": im, "caption": f"caption {i}"} for i, im in enumerate(images)]))
  records = read_llava_captions(tmp_path / "chat.json", tmp_path)
  c = config.copy_and_resolve_references()
  c.train.batch_size = 2
  batches, _ = _take(pipeline.make_train_dataset(c, tok, records=records), 3)   # two epochs
  stream = _stream_items(c, 3, 12)
  kept = [j for j, item in enumerate(stream) if item != 1][:6]
  assert sum(int(b["skipped_images"].sum()) for b in batches) == stream[:kept[-1]].count(1) > 0
  c.data.strict_images = True
  with pytest.raises(ImageError, match="bad.jpg"):
    _take(pipeline.make_train_dataset(c, tok, records=records), 3)


# ------------------------------------------------------------------ KptLLM: tasks with supports

KB, SHOTS, ROUNDS, MAX_LEN = 6, 2, 2, 160


def _kpt_config(root):
  c = tiny.get_config().unlock()
  c.model.kpt.enabled = True
  c.data.train.update(source="synthetic_objects", path=str(root), num_images=12, split="train")
  c.data.update(tasks="semantic:1,visual:1,textual:1", shots=SHOTS, rounds=ROUNDS,
                max_len=MAX_LEN, coord_format="keypoint_token", read_threads=1)
  c.data.augment.flip_prob = 0.0        # markers are chiral (synthetic_objects docstring)
  c.train.batch_size = KB
  return c.lock()


@pytest.fixture(scope="module")
def kpt_setup(tmp_path_factory):
  config = _kpt_config(tmp_path_factory.mktemp("objects"))
  tok = load_tokenizer("")
  records = pipeline.load_records(config, "train")
  it = iter(pipeline.make_train_dataset(config, tok, records=records))
  return config, tok, records, [next(it) for _ in range(4)]


def test_kptllm_batch_shapes(kpt_setup):
  config, _, records, batches = kpt_setup
  side = config.model.vit.image_size
  b = batches[0]
  assert len(records) == 12
  assert b["image"].shape == (KB, side, side, 3) and b["tokens"].shape == (KB, MAX_LEN)
  assert b["support_image"].shape == (KB, SHOTS, side, side, 3)
  assert b["support_xy"].shape == (KB, SHOTS, ROUNDS, 2)
  assert b["support_mask"].shape == (KB, SHOTS, ROUNDS)
  assert b["kpt_xy"].shape == (KB, ROUNDS, 2) and b["kpt_mask"].shape == (KB, ROUNDS)


def test_kptllm_tasks_mix_and_slots_match_tokens(kpt_setup):
  config, _, _, batches = kpt_setup
  k = config.model.kpt
  seen = set()
  for b in batches:
    for row in range(KB):
      prompts = int(np.sum(b["tokens"][row] == k.prompt_token_id))
      keypoints = int(np.sum(b["tokens"][row] == k.keypoint_token_id))
      assert keypoints == int(b["kpt_mask"][row].sum())
      assert prompts == int(np.sum(b["support_mask"][row].max(0) > 0))
      if prompts and keypoints:
        seen.add("visual")
        assert np.any(b["support_image"][row, 1] != 0)         # two shots drawn
      elif prompts:
        seen.add("semantic")
        np.testing.assert_array_equal(b["support_image"][row, 0], b["image"][row])
        assert not np.any(b["support_mask"][row, 1])            # one support: the query
      elif keypoints:
        seen.add("textual")
        assert not np.any(b["support_mask"][row]) and not np.any(b["support_image"][row])
  assert seen == {"semantic", "visual", "textual"}


def test_kptllm_semantic_prompt_is_the_answered_keypoint(kpt_setup):
  """In a semantic row the prompt sits at the query keypoint the round asks about; the
  loss covers only answers."""
  _, _, _, batches = kpt_setup
  for b in batches:
    for row in range(KB):
      mask = b["support_mask"][row]
      if mask[0].any() and not mask[1].any() and not b["kpt_mask"][row].any():
        rounds = mask[0] > 0
        np.testing.assert_allclose(b["support_xy"][row, 0][rounds], b["kpt_xy"][row][rounds],
                                   atol=1e-6)
        assert np.all(b["loss_mask"][row][b["input_mask"][row] == 0] == 0)
        return
  pytest.fail("no semantic row in 4 batches")


def test_kptllm_deterministic_by_seed(kpt_setup):
  config, tok, records, batches = kpt_setup
  again = next(iter(pipeline.make_train_dataset(config, tok, records=records)))
  assert all(np.array_equal(again[k], batches[0][k]) for k in again)


def test_kptllm_unreadable_image_skips_the_element_or_raises_when_strict(kpt_setup, tmp_path):
  config, tok, records, batches = kpt_setup
  corrupt = tmp_path / "corrupt.jpg"
  corrupt.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
  broken = list(records)
  broken[0] = dataclasses.replace(broken[0], image_path=str(corrupt))
  def counts(cfg):
    it = iter(pipeline.make_train_dataset(cfg, tok, records=broken))
    return [next(it)["skipped_images"] for _ in range(4)]
  first = counts(config)
  assert sum(int(c.sum()) for c in first) > 0                # the query or a support
  assert all(np.array_equal(a, b) for a, b in zip(first, counts(config)))   # deterministic
  assert not any(b["skipped_images"].any() for b in batches)   # intact records: none
  strict = config.copy_and_resolve_references()
  strict.data.strict_images = True
  with pytest.raises(ImageError, match="corrupt.jpg"):
    counts(strict)
