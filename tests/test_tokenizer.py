"""The bundled tiny tokenizer: fixed special ids, one token per digit, exact round trips,
short template rounds, rebuilt byte-identically by its script; HF dirs load too."""

import pytest

from kptjax.data import build_tiny_tokenizer, conversation, tokenizer as tokenizer_lib
from kptjax.keypoints import get_spec, list_specs


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.load_tokenizer("")


def test_special_ids_and_size(tok):
  assert [tok.convert_tokens_to_ids(t) for t in ("<pad>", "<s>", "</s>", "<unk>", "<image>")] \
      == [0, 1, 2, 3, 4]
  assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
  assert tok.convert_tokens_to_ids("<loc_0>") == 5
  assert tok.convert_tokens_to_ids("<loc_99>") == 104
  assert len(tok) <= 512          # config.model.llm.vocab_size of configs/tiny.py


def test_digits_are_single_tokens(tok):
  ids = tok.encode("[0.412,0.733]", add_special_tokens=False)
  assert len(ids) == 13           # as with Llama's digit-splitting tokenizer
  assert tok.convert_ids_to_tokens(ids) == list("[0.412,0.733]")
  for d in "0123456789":
    assert len(tok.encode(d, add_special_tokens=False)) == 1
  assert len(tok.encode("[0.412,0.733,0.512345]", add_special_tokens=False)) == 22


def test_round_trip(tok):
  texts = ["Where is the left knee of this person in this image? Please provide its coordinates.",
           "Image: \nAnswer: [0.000,0.999]", "Hello, World! (x=1; y=2)", "<loc_3><loc_97>"]
  for name in list_specs():
    spec = get_spec(name)
    texts += list(spec.names) + [d for d in spec.descriptions if d]
  for text in texts:
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.unk_token_id not in ids, text
    assert tok.decode(ids) == text
  # Characters outside the alphabet become <unk>.
  assert tok.unk_token_id in tok.encode("\u00fc", add_special_tokens=False)


def test_template_words_are_single_tokens(tok):
  for word in ("Keypoint:", "Question:", "Answer:", "Image:", "User:", "Assistant:",
               "Reference:"):
    assert len(tok.encode(word, add_special_tokens=False)) == 1, word
  for word in ("\u2581Where", "\u2581person", "\u2581coordinates.", "\u2581left", "\u2581shoulder"):
    assert word in tok.get_vocab(), word
  enc = conversation.ConversationEncoder(tok, dict(template="locllm", use_descriptions=False), 0)
  assert len(enc.query("left shoulder")) <= 20


def test_bundled_file_is_what_the_script_builds():
  assert build_tiny_tokenizer.build() == tokenizer_lib.TINY_TOKENIZER_FILE.read_text("utf-8")


def test_hf_dir_loads_and_gets_location_tokens(tok, tmp_path):
  tok.save_pretrained(tmp_path)
  hf = tokenizer_lib.load_tokenizer(tmp_path)
  text = "Keypoint: nose\nAnswer: [0.1,0.2]"
  assert hf.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
  grown = tokenizer_lib.load_tokenizer(tmp_path, loc_bins=120)
  assert len(grown.encode("<loc_110>", add_special_tokens=False)) == 1
  assert grown.convert_tokens_to_ids("<loc_5>") == tok.convert_tokens_to_ids("<loc_5>")


def test_bundled_file_ignores_specs_registered_at_run_time():
  from kptjax.keypoints import make_spec
  make_spec("test_tokenizer_extra", [("visual widget tip", "the tip of the widget")])
  assert build_tiny_tokenizer.build() == tokenizer_lib.TINY_TOKENIZER_FILE.read_text("utf-8")
