"""kptjax's own CapeLLM query descriptions (kptjax/data/sources/query_descriptions.py),
from an MP-100-style category's name, keypoint names and skeleton."""

import json

from kptjax.data.sources import read_mp100
from kptjax.data.sources.query_descriptions import describe


def test_descriptions_place_and_link_each_keypoint():
  names = ["left_front_paw", "left_front_knee", "nose", "tail_tip"]
  texts = describe("dog", names, [[0, 1], [2, 3]])
  assert texts == [
      "The left front paw of the dog: on the dog's left side, at the front. "
      "It is linked to the left front knee.",
      "The left front knee of the dog: on the dog's left side, at the front. "
      "It is linked to the left front paw.",
      "The nose of the dog. It is linked to the tail tip.",
      "The tail tip of the dog: at the tip. It is linked to the nose.",
  ]
  assert len(set(describe("chair", ["leg"] * 2))) == 1


def test_read_mp100_generated_descriptions_unless_the_file_has_them(tmp_path):
  cats = [{"id": 1, "name": "swivel_chair", "keypoints": ["left_armrest", "seat_center"],
           "skeleton": [[1, 2]]},
          {"id": 2, "name": "cup", "keypoints": ["rim", "handle"],
           "keypoint_descriptions": ["The cup's rim.", "The cup's handle."]}]
  anns = [{"id": i + 1, "image_id": i + 1, "category_id": i + 1, "bbox": [2, 2, 20, 20],
           "keypoints": [5, 5, 2, 9, 9, 2]} for i in range(2)]
  images = [{"id": i + 1, "file_name": f"{i}.jpg", "width": 32, "height": 32} for i in range(2)]
  path = tmp_path / "mp.json"
  path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
  specs = read_mp100(path, tmp_path, descriptions="generated", check_images=False,
                     spec_prefix="test_qd/").specs
  chair, cup = specs["test_qd/swivel_chair"], specs["test_qd/cup"]
  assert list(chair.descriptions) == describe("swivel_chair", ["left_armrest", "seat_center"],
                                              [[0, 1]])
  assert chair.descriptions[0].startswith("The left armrest of the swivel chair: on the "
                                          "swivel chair's left side")
  assert list(cup.descriptions) == ["The cup's rim.", "The cup's handle."]
  plain = read_mp100(path, tmp_path, check_images=False, spec_prefix="test_qd2/").specs
  assert plain["test_qd2/swivel_chair"].descriptions[1] == "The seat center of the swivel chair."
