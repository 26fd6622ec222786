"""Synthetic non-human categories as an MP-100-style file: read by read_mp100 with one
spec per category (names, descriptions, flip pairs), keypoints inside the image and on
their coloured markers, deterministic per image, cached."""

import numpy as np

from kptjax.data import cape, synthetic_objects as so
from kptjax.data.sources import ap10k, read_mp100
from kptjax.keypoints import get_spec


def test_generated_split_reads_as_mp100(tmp_path):
  ann, root = so.generate_objects(tmp_path, num_images=12, seed=1, split="train",
                                  image_size=64)
  records = read_mp100(ann, root)
  assert len(records) == 12 and records.num_skipped == 0
  assert {r.spec for r in records} <= {f"mp100/{c}" for c in so.CATEGORIES}
  square = get_spec("mp100/square")
  assert square.names == ("top left corner", "top right corner", "bottom right corner",
                          "bottom left corner")
  assert square.flip_pairs == ((0, 1), (2, 3))         # left <-> right by name
  assert get_spec("mp100/quadruped").flip_pairs == ((4, 5), (6, 7))
  assert get_spec("mp100/quadruped").description_of("tail tip") == "The free end of the tail."
  for r in records:
    k = r.keypoints
    assert np.all((k[:, :2] >= 0) & (k[:, :2] < 64)) and np.all(k[:, 2] == 2)
    x, y, w, h = r.box
    assert np.all((k[:, 0] >= x - 1) & (k[:, 0] <= x + w + 1))
  # Families for cross-family splits; supports within a category.
  assert ap10k.family_category_ids(ann, "animal") == [1]
  assert all(records[s].spec == records[q].spec for q, sup in cape.sample_supports(records, 1)
             for s in sup)


def test_markers_sit_on_keypoints_and_images_are_deterministic(tmp_path):
  image, name, kp, _ = so.render_object(3, "train", 5, 96)
  again, _, kp2, _ = so.render_object(3, "train", 5, 96, tuple(so.CATEGORIES))
  np.testing.assert_array_equal(image, again)
  np.testing.assert_array_equal(kp, kp2)
  colours = [c for _, _, c in so.CATEGORIES[name][1]]
  for (x, y, _), rgb in zip(kp, colours):
    pixel = image[int(round(y)), int(round(x))].astype(int)
    assert np.abs(pixel - np.asarray(rgb)).max() < 60, (name, pixel, rgb)
  other, *_ = so.render_object(3, "val", 5, 96)
  assert not np.array_equal(image, other)


def test_cached(tmp_path):
  ann, _ = so.generate_objects(tmp_path, num_images=3, seed=0, split="val", image_size=48)
  stamp = (tmp_path / "annotations" / "val.json").stat().st_mtime_ns
  assert so.generate_objects(tmp_path, num_images=3, seed=0, split="val", image_size=48)[0] == ann
  assert (tmp_path / "annotations" / "val.json").stat().st_mtime_ns == stamp
