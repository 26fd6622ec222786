"""Conversations: the LocLLM golden string for a real COCO person, the loss mask on answers
and end-of-turn only, prefix/query consistency, other templates and coordinate formats."""

import ml_collections
import numpy as np
import pytest

from kptjax.data import conversation as conv, coords, transforms
from kptjax.data.sources import read_coco_keypoints
from kptjax.data.tokenizer import load_tokenizer
from kptjax.errors import ConfigError
from kptjax.inference.prompts import stop_token_id
from kptjax.keypoints import get_spec

N_IMAGE = 4          # image placeholder slots (a 224 crop with 14 px patches has 256)
SEED = 0
LOCLLM_ROUND = ("Keypoint: {description}\nQuestion: Where is the {name} of this person in this "
                "image? Please provide its coordinates.\nAnswer: ")


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer("")


@pytest.fixture(scope="module")
def spec():
  return get_spec("coco17")


@pytest.fixture(scope="module")
def person_crop(shared_data):
  """Keypoints f32[17, 3] in the 224 crop of COCO annotation 460541 (image 196141), whose
  right eye and right ear are unlabeled."""
  coco = shared_data / "coco"
  records = read_coco_keypoints(coco / "test_coco.json", coco, spec="coco17")
  record = next(r for r in records if r.ann_id == 460541)
  crop = transforms.crop_person(record, transforms.load_record_image(record), (224, 224),
                                padding=1.0)
  return crop["keypoints"]


def _cfg(**kw):
  base = dict(template="locllm", coord_format="decimal2d", use_descriptions=True, rounds=5,
              max_len=0, loc_bins=100)
  base.update(kw)
  return base


def _decode(tok, ids):
  return tok.decode([int(i) for i in ids], skip_special_tokens=False)


def test_locllm_golden(tok, spec, person_crop):
  out = conv.encode_training_example(person_crop, 224, spec, tok, _cfg(), N_IMAGE,
                                     np.random.default_rng(SEED))
  # LocLLM's sampling: shuffle the 17 keypoints with the seed, drop unlabeled / out of
  # crop (here the right eye and right ear), keep the first 5.
  order = np.random.default_rng(SEED).permutation(17)
  kp = person_crop
  chosen = [int(i) for i in order if kp[i, 2] > 0
            and 0 <= kp[i, 0] < 224 and 0 <= kp[i, 1] < 224][:5]
  assert [spec.names[i] for i in chosen] == \
      ["right wrist", "left ear", "left hip", "nose", "left elbow"]
  expected = "<s>Image: " + "<image>" * N_IMAGE + "\n"
  for i in chosen:
    expected += LOCLLM_ROUND.format(description=spec.descriptions[i], name=spec.names[i])
    expected += f"[{kp[i, 0] / 224:.3f},{kp[i, 1] / 224:.3f}]</s>"
  assert expected.count("[0.") == 5 and "[0.323,0.229]</s>" in expected
  n = int(out["input_mask"].sum())
  assert _decode(tok, out["tokens"][:n]) == expected
  assert out["num_rounds"] == 5 and len(out["tokens"]) == n


def test_loss_mask_covers_answers_and_end_of_turn(tok, spec, person_crop):
  out = conv.encode_training_example(person_crop, 224, spec, tok, _cfg(max_len=400), N_IMAGE,
                                     np.random.default_rng(SEED))
  tokens, targets, mask = out["tokens"], out["targets"], out["loss_mask"]
  n = int(out["input_mask"].sum())
  assert tokens.shape == targets.shape == mask.shape == (400,)
  assert np.array_equal(targets[:n - 1], tokens[1:n])          # next-token targets
  assert np.all(targets[n - 1:] == tok.pad_token_id) and np.all(tokens[n:] == tok.pad_token_id)
  assert not out["input_mask"][n:].any()
  # Masked targets, in order, spell exactly the five answers with their </s>.
  assert _decode(tok, targets[mask > 0]) == \
      "[0.323,0.229]</s>[0.440,0.113]</s>[0.490,0.503]</s>[0.383,0.123]</s>[0.376,0.299]</s>"
  assert mask.sum() == 5 * (13 + 1)
  # ... and every unmasked real target is prompt text (no answer token escapes the mask).
  starts = [t for t in range(1, n - 1) if mask[t] and not mask[t - 1]]
  assert len(starts) == 5
  for t in starts:
    assert _decode(tok, tokens[t - 3:t + 1]).endswith("Answer: ")


def test_prefix_and_query_match_training(tok, spec, person_crop):
  cfg = _cfg()
  out = conv.encode_training_example(person_crop, 224, spec, tok, cfg, N_IMAGE,
                                     np.random.default_rng(SEED))
  prefix = conv.encode_prefix(tok, cfg, N_IMAGE)
  query = conv.encode_query(tok, cfg, "right wrist", spec.description_of("right wrist"))
  assert prefix == [1] + tok.encode("Image: ", add_special_tokens=False) + [4] * N_IMAGE + \
      tok.encode("\n", add_special_tokens=False)
  assert list(out["tokens"][:len(prefix) + len(query)]) == prefix + query
  answer = conv.format_answer([0.323, 0.229], cfg)
  assert _decode(tok, query) + answer == LOCLLM_ROUND.format(
      description=spec.description_of("right wrist"), name="right wrist") + "[0.323,0.229]"
  # The placeholder id comes from the model config when given (Llama dirs: 0).
  assert conv.encode_prefix(tok, cfg, 2, image_token_id=0).count(0) == 2


def test_no_descriptions_and_other_templates(tok, spec, person_crop):
  rng = lambda: np.random.default_rng(SEED)  # noqa: E731
  plain = conv.encode_training_example(person_crop, 224, spec, tok, _cfg(use_descriptions=False),
                                       N_IMAGE, rng())
  text = _decode(tok, plain["tokens"][plain["input_mask"]])
  assert "Keypoint:" not in text and text.startswith(
      "<s>Image: " + "<image>" * N_IMAGE + "\nQuestion: Where is the right wrist of this person")

  cape = conv.encode_training_example(person_crop, 224, spec, tok, _cfg(template="capellm"),
                                      N_IMAGE, rng())
  text = _decode(tok, cape["tokens"][cape["input_mask"]])
  assert text.startswith(
      "<s>" + "<image>" * N_IMAGE + "\nUser: Where is the right wrist of this object in this "
      "image? Please provide its coordinates.\nReference: "
      + spec.description_of("right wrist") + "\nAssistant: [0.323,0.229]</s>User: ")

  compact = conv.encode_training_example(person_crop, 224, spec, tok,
                                         _cfg(template="compact", use_descriptions=False),
                                         N_IMAGE, rng())
  text = _decode(tok, compact["tokens"][compact["input_mask"]])
  assert text == "<s>" + "<image>" * N_IMAGE + (
      "right wrist?[0.323,0.229]</s>left ear?[0.440,0.113]</s>left hip?[0.490,0.503]</s>"
      "nose?[0.383,0.123]</s>left elbow?[0.376,0.299]</s>")

  for out in (plain, cape, compact):
    assert _decode(tok, out["targets"][out["loss_mask"] > 0]).count("</s>") == 5


def test_chat_template(tok, spec, person_crop):
  cfg = _cfg(template="chat", rounds=2)
  out = conv.encode_training_example(person_crop, 224, spec, tok, cfg, N_IMAGE,
                                     np.random.default_rng(SEED))
  text = _decode(tok, out["tokens"][out["input_mask"]])
  assert text == ("<s>User: Image: " + "<image>" * N_IMAGE + "\nKeypoint: "
                  + spec.description_of("right wrist") + "\nQuestion: Where is the right wrist "
                  "of this person in this image? Please provide its coordinates.\nAssistant: "
                  "[0.323,0.229]</s>User: Keypoint: " + spec.description_of("left ear")
                  + "\nQuestion: Where is the left ear of this person in this image? Please "
                  "provide its coordinates.\nAssistant: [0.440,0.113]</s>")
  assert _decode(tok, out["targets"][out["loss_mask"] > 0]) == "[0.323,0.229]</s>[0.440,0.113]</s>"
  prefix = conv.encode_prefix(tok, cfg, N_IMAGE)
  query = conv.encode_query(tok, cfg, "right wrist", spec.description_of("right wrist"))
  assert list(out["tokens"][:len(prefix) + len(query)]) == prefix + query
  end = conv.ConversationEncoder(tok, cfg, N_IMAGE).end_of_turn()   # the answers' '</s>'
  assert end == [tok.eos_token_id]
  assert stop_token_id(tok, ml_collections.ConfigDict(cfg)) == end[-1]


def test_coordinate_formats(tok, spec, person_crop):
  assert conv.format_answer([0.5, 0.25], _cfg()) == "[0.500,0.250]"
  assert conv.format_answer([0.99996, -0.1], _cfg()) == "[0.999,0.000]"   # parseable: 0\.\d+
  assert conv.format_answer([0.5, 0.25, 0.51234567], _cfg(coord_format="decimal3d")) == \
      "[0.500,0.250,0.512346]"
  loc = _cfg(coord_format="loc_tokens")
  assert conv.format_answer([0.5, 0.257], loc) == "<loc_50><loc_25>"
  np.testing.assert_allclose(coords.parse_loc_answer("<loc_50><loc_25>"), [0.505, 0.255])
  out = conv.encode_training_example(person_crop, 224, spec, tok, loc, N_IMAGE,
                                     np.random.default_rng(SEED))
  assert out["loss_mask"].sum() == 5 * (2 + 1)                  # two location tokens + </s>
  # 3D: keypoints [K, 4] with z relative to the root in mm.
  kp4 = np.concatenate([person_crop[:, :2], np.full((17, 1), 200.0), person_crop[:, 2:]], 1)
  out = conv.encode_training_example(kp4, 224, spec, tok, _cfg(coord_format="decimal3d"),
                                     N_IMAGE, np.random.default_rng(SEED))
  assert _decode(tok, out["targets"][out["loss_mask"] > 0]).startswith("[0.323,0.229,0.600000]</s>")
  with pytest.raises(ConfigError, match="coord_format"):
    conv.format_answer([0.5, 0.5], _cfg(coord_format="polar"))


def test_max_len_drops_whole_rounds_and_groups(tok, spec, person_crop):
  full = conv.encode_training_example(person_crop, 224, spec, tok, _cfg(), N_IMAGE,
                                      np.random.default_rng(SEED))
  n = int(full["input_mask"].sum())
  short = conv.encode_training_example(person_crop, 224, spec, tok, _cfg(max_len=n - 1),
                                       N_IMAGE, np.random.default_rng(SEED))
  assert short["num_rounds"] == 4 and short["loss_mask"].sum() == 4 * 14
  with pytest.raises(ConfigError, match="max_len"):
    conv.encode_training_example(person_crop, 224, spec, tok, _cfg(max_len=20), N_IMAGE,
                                 np.random.default_rng(SEED))
  # CapeLLM groups: exactly the given keypoints, in order, minus unlabeled ones (2, 4).
  grouped = conv.encode_training_example(person_crop, 224, spec, tok,
                                         _cfg(template="compact", use_descriptions=False),
                                         N_IMAGE, None, keypoint_ids=[4, 16, 2, 0])
  text = _decode(tok, grouped["tokens"][grouped["input_mask"]])
  assert text.count("?") == 2 and text.index("right ankle?") < text.index("nose?")


def test_held_out_keypoints_never_appear_in_a_training_conversation():
  """LocLLM Table 7's protocol: right elbow, left wrist, left knee, right ankle held out;
  the real pipeline (flip augmentation on, which swaps left/right labels) never asks them,
  and asks every other keypoint."""
  from configs import tiny
  from kptjax.data import pipeline
  from kptjax.data.tokenizer import load_tokenizer
  held = ["right elbow", "left wrist", "left knee", "right ankle"]
  config = tiny.get_config()
  with config.unlocked():
    config.data.update(heldout_keypoints=",".join(held), rounds=17)
    config.data.augment.flip_prob = 1.0
  tok = load_tokenizer("")
  it = iter(pipeline.make_train_dataset(config, tok))
  asked = set()
  names = get_spec("coco17").names
  for _ in range(4):
    batch = next(it)
    for row, mask in zip(batch["tokens"], batch["input_mask"]):
      text = tok.decode([int(t) for t in row[mask]], skip_special_tokens=False)
      asked |= {n for n in names if f"Where is the {n} of" in text}
  assert asked.isdisjoint(held)
  assert asked == set(names) - set(held)


class _SlowOnly:
  """A tokenizer whose wrapper ``encode`` differs from its Rust backend's (the first id
  doubled): the encoder must notice and keep the wrapper."""

  def __init__(self, tok):
    self._tok = tok

  def __getattr__(self, name):
    return getattr(self._tok, name)

  def encode(self, text, add_special_tokens=True):
    ids = self._tok.encode(text, add_special_tokens=add_special_tokens)
    return ids[:1] * 2 + ids[1:]


def _llama_like_tokenizer():
  """A SentencePiece-BPE fast tokenizer (Llama's kind: metaspace, byte fallback off)
  trained here on the template texts, wrapped as transformers loads a Llama directory."""
  import tokenizers
  from transformers import PreTrainedTokenizerFast
  sp = tokenizers.SentencePieceBPETokenizer()
  corpus = [t for texts in conv.TEMPLATE_TEXT.values() for t in texts.values()]
  corpus += list(get_spec("coco17").names) + ["[0.412,0.733]", "0123456789,.[]-"]
  sp.train_from_iterator(corpus * 20, vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
  return PreTrainedTokenizerFast(tokenizer_object=sp._tokenizer, unk_token="<unk>",
                                 bos_token="<s>", eos_token="</s>", pad_token="<unk>")


@pytest.mark.parametrize("which", ["bundled", "bundled_loc", "llama_like"])
def test_rust_backend_tokenizes_as_the_wrapper(which, tok, spec, person_crop):
  """Every training example is the same whether segments go through the tokenizer's Rust
  backend (the fast path) or the transformers wrapper."""
  t = dict(bundled=lambda: tok, bundled_loc=lambda: load_tokenizer("", loc_bins=100),
           llama_like=_llama_like_tokenizer)[which]()
  fmt = "loc_tokens" if which == "bundled_loc" else "decimal2d"
  rng = np.random.default_rng(3)
  for template in ("locllm", "compact", "capellm"):
    fast = conv.ConversationEncoder(t, _cfg(template=template, coord_format=fmt), N_IMAGE)
    slow = conv.ConversationEncoder(t, _cfg(template=template, coord_format=fmt), N_IMAGE)
    slow._backend = None
    assert fast._backend is not None
    for _ in range(30):
      kp = person_crop.copy()
      kp[:, :2] = rng.uniform(0, 224, size=(17, 2))
      seed = int(rng.integers(1 << 30))
      a = fast.encode(kp, 224, spec, np.random.default_rng(seed))
      b = slow.encode(kp, 224, spec, np.random.default_rng(seed))
      assert a.keys() == b.keys()
      for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"{which} {template} {k}")


def test_rust_backend_is_not_used_when_it_disagrees(tok, spec, person_crop):
  odd = _SlowOnly(tok)
  enc = conv.ConversationEncoder(odd, _cfg(template="compact"), N_IMAGE)
  assert enc._backend is None
  assert enc.tokenize("left knee?") == odd.encode("left knee?", add_special_tokens=False)
