"""Keypoint specs: built-in body models, LocLLM's descriptions, user spec files."""

import json
import re

import numpy as np
import pytest

from kptjax.errors import DataError
from kptjax.keypoints import (
    KeypointSpec,
    get_spec,
    list_specs,
    load_spec_file,
    make_spec,
    register_spec,
)

BUILTIN = {"coco17": 17, "coco17+neck_pelvis": 19, "humanart21": 21, "mpii16": 16,
           "h36m17": 17, "ap10k17": 17, "crowdpose14": 14, "aic14": 14}


def _appendix_a(papers_dir):
  """name -> description parsed from the '• name: text' bullets of LocLLM Appendix A."""
  text = (papers_dir / "001_eed2bc18fe20318e.txt").read_text(encoding="utf-8")
  section = text.split("Appendix A Keypoint Location Description", 2)[-1]
  section = section.split("Appendix B", 1)[0]
  bullets = [b.strip().rstrip("|").strip() for b in section.split("•")[1:]]
  return dict(b.split(": ", 1) for b in bullets)


@pytest.mark.parametrize("name,count", sorted(BUILTIN.items()))
def test_builtin_spec_is_consistent(name, count):
  spec = get_spec(name)
  assert spec.name == name and spec.num_keypoints == count
  assert len(set(spec.names)) == count and len(spec.descriptions) == count
  assert all(d.strip() for d in spec.descriptions)
  perm = spec.flip_permutation()
  np.testing.assert_array_equal(perm[perm], np.arange(count))  # a flip is an involution
  for i, j in spec.flip_pairs:  # pairs swap 'left X' with 'right X'
    assert spec.names[i].replace("left", "right") == spec.names[j] or \
        spec.names[i].replace("right", "left") == spec.names[j]
  assert all(0 <= i < count and 0 <= j < count for i, j in spec.skeleton)
  if spec.sigmas is not None:
    assert len(spec.sigmas) == count and all(s > 0 for s in spec.sigmas)
  assert set(BUILTIN) <= set(list_specs())


def test_coco17_descriptions_are_locllm_appendix_a_verbatim(shared_data):
  appendix = _appendix_a(shared_data.parent / "papers")
  assert len(appendix) == 19
  spec = get_spec("coco17+neck_pelvis")
  assert spec.names[:17] == get_spec("coco17").names
  assert spec.names[17:] == ("neck", "pelvis")
  for name, text in zip(spec.names, spec.descriptions):
    assert text == appendix[name], name


def test_sigmas_match_reference_evaluators():
  from pycocotools.cocoeval import COCOeval
  np.testing.assert_allclose(get_spec("coco17").sigmas, COCOeval(iouType="keypoints").params.kpt_oks_sigmas)
  # CrowdPose API (crowdposetools/cocoeval.py): [.79,.79,.72,.72,.62,.62,1.07,1.07,.87,.87,.89,.89,.79,.79]/10
  np.testing.assert_allclose(get_spec("crowdpose14").sigmas,
                             np.array([.79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89,
                                       .89, .79, .79]) / 10.0)
  assert get_spec("h36m17").sigmas is None and get_spec("mpii16").sigmas is None


def test_names_are_as_asked_and_flip_partners():
  coco = get_spec("coco17")
  assert coco.names[5] == "left shoulder" and coco.flip_partner("left shoulder") == "right shoulder"
  assert coco.flip_partner("nose") == "nose"
  h36m = get_spec("h36m17")
  assert h36m.names[1] == "right hip" and h36m.root_index == 0 and h36m.names[0] == "pelvis"
  assert get_spec("ap10k17").subject == "animal"
  assert get_spec("mpii16").names[8] == "neck" and get_spec("mpii16").names[6] == "pelvis"


def test_user_yaml_extends_a_base_spec(tmp_path):
  path = tmp_path / "feet.yaml"
  path.write_text(
      "name: coco17+feet\nbase: coco17\n"
      "keypoints:\n"
      "  - {name: left big toe, flip: right big toe, description: The big toe of the left foot.}\n"
      "  - {name: right big toe, description: The big toe of the right foot.}\n"
      "skeleton:\n  - [left ankle, left big toe]\n")
  spec = load_spec_file(path)
  assert spec.num_keypoints == 19 and spec.names[-2:] == ("left big toe", "right big toe")
  assert spec.flip_partner("left big toe") == "right big toe"
  assert spec.flip_partner("left knee") == "right knee"  # the base's pairs are kept
  assert spec.skeleton[-1] == (15, 17)
  assert spec.sigmas is None  # the new keypoints have none
  # get_spec accepts the file path and registers the spec under its name.
  assert get_spec(str(path)) == spec and get_spec("coco17+feet") == spec


def test_user_json_whole_body_model(tmp_path):
  path = tmp_path / "hand.json"
  path.write_text(json.dumps({
      "name": "two_points", "subject": "hand",
      "keypoints": [{"name": "thumb tip", "description": "Tip of the thumb.", "sigma": 0.03},
                    {"name": "index tip", "description": "Tip of the index finger.",
                     "sigma": 0.03}]}))
  spec = load_spec_file(path, register=True)
  assert spec.sigmas == (0.03, 0.03) and spec.flip_pairs == () and spec.subject == "hand"
  assert get_spec("two_points") is spec


def test_make_spec_for_novel_keypoints():
  spec = make_spec("coco17+chin", [("chin", "The chin is the lowest point of the face.")],
                   base="coco17")
  assert spec.names[-1] == "chin" and get_spec("coco17+chin") is spec


@pytest.mark.parametrize("content,field", [
    ("name: x\nkeypoints:\n  - {name: left a, flip: right b, description: d}\n",
     "keypoints[0].flip"),
    ("name: x\nkeypoints:\n  - {name: a}\n", "keypoints[0].description"),
    ("name: x\nbase: no_such_spec\nkeypoints: []\n", "base"),
    ("name: x\nkeypoints:\n  - {name: a, description: d}\n  - {name: a, description: d}\n",
     "keypoints[1].name"),
    ("name: x\nkeypoints:\n  - {name: a, description: d}\nskeleton:\n  - [a, b]\n", "skeleton[0]"),
    ("keypoints:\n  - {name: a, description: d}\n", "name"),
    ("name: x\nkeypoints:\n  - {name: a, description: d, sigma: -1}\n", "keypoints[0].sigma"),
])
def test_bad_spec_file_names_file_and_field(tmp_path, content, field):
  path = tmp_path / "bad.yaml"
  path.write_text(content)
  with pytest.raises(DataError) as err:
    load_spec_file(path)
  assert err.value.field == field and str(path) in str(err.value)


def test_malformed_spec_file_is_a_data_error(tmp_path):
  path = tmp_path / "broken.json"
  path.write_text('{"name": "x", "keypoints": [')
  with pytest.raises(DataError, match=re.escape(str(path))):
    load_spec_file(path)
  with pytest.raises(DataError, match="cannot read"):
    load_spec_file(tmp_path / "absent.yaml")


def test_register_spec_refuses_a_silent_replacement():
  spec = KeypointSpec(name="coco17", names=("a",), descriptions=("d",))
  with pytest.raises(ValueError):
    register_spec(spec)
  with pytest.raises(KeyError):
    get_spec("no_such_spec")
