"""The data side of the papers' protocols (issue 17): Human3.6M's subject / frame-stride
filter and the H36M + MPII training mix (LocLLM Table 5; 2D-only MPII answered in
decimal2d), CapeLLM's dynamic rounds (vary per element, same in two runs, resume
exactly), KptLLM's cross-supercategory MP-100 split and the split protocol recorded for
metrics.json."""

import copy
import json

import grain
import numpy as np
import pytest

from configs import locllm_h36m, tiny
from kptjax.data import cape, pipeline
from kptjax.data.sources import read_dataset, read_h36m, read_mp100
from kptjax.data.sources.catalog import parse_options, train_entries
from kptjax.data.tasks.rounds import RoundsElement
from kptjax.data.tokenizer import load_tokenizer
from kptjax.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer("")


def _h36m(shared_data, **kw):
  return read_h36m(shared_data / "h36m/h36m_coco.json", shared_data / "h36m",
                   camera_file=shared_data / "h36m/cameras.from_pkl.json", **kw)


# ------------------------------------------------------------ H36M protocol filter
def test_h36m_subject_and_frame_stride_filters(shared_data):
  # Frames S1 #1, S5 #2061, S7 #396, S8 #26 (1-based): index 0, 2060, 395, 25.
  assert len(_h36m(shared_data)) == 4
  train = _h36m(shared_data, subjects="S1|S5|S6|S7|S8", frame_stride=5)
  assert len(train) == 4                       # mmpose's frames are every 5th already
  two = _h36m(shared_data, subjects="S1|S5")
  assert [r.image_path.split("/")[-1][:2] for r in two] == ["S1", "S5"]
  assert two.skipped["other_subject"] == 2
  strided = _h36m(shared_data, frame_stride=64)
  assert [r.image_path.endswith("_000001.jpg") for r in strided] == [True]
  assert strided.skipped["between_strides"] == 3
  test = _h36m(shared_data, subjects="S9|S11", frame_stride=64)
  assert len(test) == 0 and test.skipped["other_subject"] == 4
  # The npz form and the config's options string (read_dataset) filter alike.
  npz = read_dataset("h36m", shared_data / "h36m/test_h36m_body3d.npz", shared_data / "h36m",
                     **parse_options(locllm_h36m.h36m_options(("S5", "S7"), 5)))
  assert [r.extra["imgname"][:2] for r in npz] == ["S5", "S7"]


def test_h36m_filter_needs_frame_names(shared_data, tmp_path):
  data = json.loads((shared_data / "h36m/h36m_coco.json").read_text())
  data["images"][0]["file_name"] = "frame.jpg"
  bad = tmp_path / "h36m.json"
  bad.write_text(json.dumps(data))
  with pytest.raises(DataError, match="names no subject"):
    read_h36m(bad, shared_data / "h36m", frame_stride=5)
  with pytest.raises(ConfigError, match="frame_stride"):
    read_h36m(bad, shared_data / "h36m", frame_stride=0)


# ------------------------------------------------------------- H36M + MPII mixture
def _mix_config(shared_data, weights=(1.0, 1.0)):
  c = tiny.get_config().unlock()
  base = dict(c.data.eval)
  c.data.train = dict(
      h36m=dict(base, source="h36m", ann_file=str(shared_data / "h36m/h36m_coco.json"),
                image_root=str(shared_data / "h36m"), weight=weights[0],
                options=f"camera_file={shared_data / 'h36m/cameras.from_pkl.json'},"
                        "subjects=S1|S5|S6|S7|S8,frame_stride=5"),
      mpii=dict(base, source="mpii", ann_file=str(shared_data / "mpii/test_mpii.json"),
                image_root=str(shared_data / "mpii"), options="", weight=weights[1]))
  c.data.coord_format, c.data.depth_optional, c.data.rounds = "decimal3d", True, 4
  c.train.batch_size = 4
  return c


def _answers(batch, tok):
  """The answer texts of each row (runs of loss_mask == 1 in the targets)."""
  out = []
  for targets, mask in zip(batch["targets"], batch["loss_mask"]):
    runs, cur = [], []
    for t, m in zip(targets, mask):
      if m:
        cur.append(int(t))
      elif cur:
        runs.append(tok.decode(cur)), cur.clear()
    out.append(runs + ([tok.decode(cur)] if cur else []))
  return out


def test_mixed_sources_weights_and_answers(shared_data, tok):
  c = _mix_config(shared_data)
  assert [t.name for t in train_entries(c.data.train)] == ["h36m", "mpii"]
  records = pipeline.load_records(c, "train")
  assert len(records) == 4 + 5 and records.skipped == {}
  stream = pipeline.mixed_items([[(i, None) for i in range(4)],
                                 [(i, None) for i in range(4, 9)]], [3.0, 1.0], 0)
  first = [stream[i][0] for i in range(40)]
  assert sum(i < 4 for i in first) == 30               # 3:1, exactly, in any 40 in a row
  assert first == [stream[i][0] for i in range(40)]
  # decimal3d: H36M answers [x,y,z]; MPII (no 3D) answers [x,y] with depth_optional.
  element = RoundsElement(c, tok, records)
  rng = np.random.default_rng(0)
  h36m, mpii = element((0, None), rng), element((5, None), rng)
  (h36m_answers,), (mpii_answers,) = _answers(
      {k: h36m[k][None] for k in h36m}, tok), _answers({k: mpii[k][None] for k in mpii}, tok)
  assert h36m_answers and all(a.count(",") == 2 for a in h36m_answers)
  assert mpii_answers and all(a.count(",") == 1 for a in mpii_answers)
  strict = copy.deepcopy(c)
  strict.data.depth_optional = False
  with pytest.raises(DataError, match="3D keypoints"):
    RoundsElement(strict, tok, records)((5, None), rng)
  bad = copy.deepcopy(c)
  bad.data.train.mpii.weight = 0.0
  with pytest.raises(ConfigError, match="weight"):
    pipeline.load_records(bad, "train")


def test_mixed_stream_is_resumable(shared_data, tok):
  c = _mix_config(shared_data)
  c.data.augment.update(dict(rotation_prob=0.0))
  ds = pipeline.make_train_dataset(c, tok)
  it = iter(ds)
  next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(2)]
  again = iter(pipeline.make_train_dataset(c, tok))
  again.set_state(state)
  for a in expected:
    b = next(again)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_locllm_h36m_config():
  c = locllm_h36m.get_config()
  assert c.data.coord_format == "decimal3d" and c.data.depth_optional
  assert {t.name: t.weight for t in train_entries(c.data.train)} == {"h36m": 1.0, "mpii": 1.0}
  assert parse_options(c.data.train.h36m.options) == {"subjects": "S1|S5|S6|S7|S8",
                                                      "frame_stride": 5}
  assert parse_options(c.data.eval.options) == {"subjects": "S9|S11", "frame_stride": 64}
  assert round(c.optim.warmup_ratio * c.train.num_steps) == 10_000
  assert [t.name for t in train_entries(locllm_h36m.get_config("h36m_only").data.train)] == [
      "h36m"]
  assert "frame_stride=1" in locllm_h36m.get_config("train_stride=1").data.train.h36m.options
  for arg, overrides in locllm_h36m.sweep():
    run = locllm_h36m.get_config(arg).unlock()
    for key, value in overrides.items():
      section, *path, name = key.split(".")
      target = run[section]
      for p in path:
        target = target[p]
      assert name in target, key


# ----------------------------------------------------------- CapeLLM dynamic rounds
@pytest.fixture(scope="module")
def coco_dynamic(shared_data):
  c = tiny.get_config().unlock()
  c.data.train.source = "coco"
  c.data.train.ann_file = str(shared_data / "coco/test_coco.json")
  c.data.train.image_root = str(shared_data / "coco")
  c.data.rounds_mode, c.data.rounds_min, c.data.rounds_max = "dynamic", 1, 6
  c.data.augment.update(dict(scale_sigma=0.0, rotation_prob=0.0, flip_prob=0.0))
  c.data.use_descriptions = False
  c.train.batch_size = 4
  return c, pipeline.load_records(c, "train")


def _rounds(batch):
  """Answers per row: runs of loss_mask == 1."""
  m = batch["loss_mask"] > 0
  return (m[:, 1:] & ~m[:, :-1]).sum(1) + m[:, 0]


def test_dynamic_rounds_vary_per_item_and_epoch(coco_dynamic, tok):
  c, records = coco_dynamic
  element = RoundsElement(c, tok, records)
  # One item under the generators of different epochs: the number and choice vary.
  asked = [tuple(element((0, None), np.random.default_rng([0, e]))["tokens"])
           for e in range(8)]
  counts = [int(_rounds({"loss_mask": element((0, None), np.random.default_rng([0, e]))
                         ["loss_mask"][None]})[0]) for e in range(8)]
  assert len(set(counts)) > 2 and min(counts) >= 1 and max(counts) <= 6
  assert len(set(asked)) == 8
  fixed = copy.deepcopy(c)
  fixed.data.rounds_mode = "fixed"
  fixed_counts = {int(_rounds({"loss_mask": RoundsElement(fixed, tok, records)(
      (0, None), np.random.default_rng([0, e]))["loss_mask"][None]})[0]) for e in range(8)}
  assert fixed_counts == {5}                    # data.rounds
  # Through the pipeline: 12 persons, 3 batches an epoch; row j of batch b is stream
  # element 4 b + j, whose item is the shuffled, repeated item list's.
  it = iter(pipeline.make_train_dataset(c, tok, records=records))
  counts = np.concatenate([_rounds(next(it)) for _ in range(6)])
  order = grain.MapDataset.source(pipeline.train_items(records, 0, 0)).shuffle(seed=0).repeat()
  per_epoch = {}
  for i, n in enumerate(counts):
    per_epoch.setdefault(order[i][0], []).append(int(n))
  assert sorted(len(v) for v in per_epoch.values()) == [2] * 12
  assert sum(a != b for a, b in per_epoch.values()) >= 3      # epochs differ per item
  assert len({a for a, _ in per_epoch.values()}) > 2           # items differ in an epoch


def test_dynamic_rounds_same_twice_and_resume_mid_epoch(coco_dynamic, tok):
  c, records = coco_dynamic
  a = iter(pipeline.make_train_dataset(c, tok, records=records))
  next(a)                                       # mid-epoch (1 of 3 batches)
  state = json.loads(json.dumps(a.get_state()))
  rest = [next(a) for _ in range(3)]            # crosses into the second epoch
  b = iter(pipeline.make_train_dataset(c, tok, records=records))
  b.set_state(state)
  c2 = iter(pipeline.make_train_dataset(c, tok, records=records))
  next(c2)
  for x in rest:
    y, z = next(b), next(c2)
    assert all(np.array_equal(x[k], y[k]) and np.array_equal(x[k], z[k]) for k in x)


def test_dynamic_rounds_config_errors(coco_dynamic, tok):
  c, records = coco_dynamic
  for fields, match in (({"group_size": 4}, "group_size=0"),
                        ({"rounds_min": 4, "rounds_max": 2}, "rounds_min"),
                        ({"rounds_mode": "random"}, "rounds_mode")):
    bad = copy.deepcopy(c)
    bad.data.update(fields)
    with pytest.raises(ConfigError, match=match):
      RoundsElement(bad, tok, records)


# ------------------------------------------------------ cross-supercategory MP-100
SUPERCATEGORIES = ["human_body", "human_face", "vehicle", "furniture", "animal_body",
                   "animal_face"]


def _mp100_file(path):
  """Two categories per supercategory, one 3-keypoint instance each (no images needed)."""
  cats, images, anns = [], [], []
  for i in range(2 * len(SUPERCATEGORIES)):
    sup = SUPERCATEGORIES[i // 2]
    cats.append(dict(id=i + 1, name=f"{sup}_{i}", supercategory=sup.replace("_", " ").title(),
                     keypoints=["a", "b", "c"], skeleton=[]))
    images.append(dict(id=i + 1, file_name=f"{i}.jpg", width=64, height=64))
    anns.append(dict(id=i + 1, image_id=i + 1, category_id=i + 1, iscrowd=0, num_keypoints=3,
                     bbox=[4, 4, 40, 40], keypoints=[10, 10, 2, 20, 20, 2, 30, 30, 2]))
  path.write_text(json.dumps(dict(images=images, annotations=anns, categories=cats)))
  return path


def test_cross_supercategory_split_files_and_protocol(tmp_path):
  ann = _mp100_file(tmp_path / "mp100_all.json")
  out = tmp_path / "annotations"
  splits = cape.write_cross_supercategory_files(ann, out)
  assert list(splits) == list(cape.KPTLLM_CROSS_SUPERCATEGORIES)
  assert splits["vehicle"] == {"test": [5, 6], "train": [1, 2, 3, 4, 7, 8, 9, 10, 11, 12]}
  for held_out, split in splits.items():
    for part in ("train", "test"):
      f = out / cape.cross_split_file_name(held_out, part)
      records = read_mp100(f, tmp_path, check_images=False)
      cats = {int(r.ann_id) for r in records}
      assert cats == set(split[part])
      assert cape.split_protocol(f) == {"split": "cross_supercategory", "held_out": held_out,
                                        "part": part, "seed": None, "source": ann.name,
                                        "file": f.name}
    assert not set(split["train"]) & set(split["test"])
  cape.write_split_files(ann, out, num_splits=2, num_val=2, num_test=4, seed=3)
  seeded = cape.split_protocol(out / cape.split_file_name(2, "test"))
  assert (seeded["split"], seeded["seed"], seeded["index"], seeded["held_out"]) == (
      "seeded", 3, 2, None)
  assert cape.split_protocol(out / cape.cross_split_file_name("furniture", "test"))[
      "split"] == "cross_supercategory"              # the seeded write kept the others
  official = out / "mp100_split1_train_official.json"
  official.write_text(ann.read_text())
  assert cape.split_protocol(official) == {"split": "files", "seed": None, "held_out": None,
                                           "file": official.name}
  entry = dict(source="mp100", path=str(tmp_path), split="mp100_cross_human_face_test",
               ann_file="", image_root="")
  assert cape.entry_split_protocol(_Entry(entry))["held_out"] == "human_face"
  with pytest.raises(DataError, match="Animal Body"):
    cape.write_cross_supercategory_files(ann, out, held_out=["clothes"])


class _Entry(dict):
  """A data entry with attribute access (as a ConfigDict)."""
  __getattr__ = dict.__getitem__
