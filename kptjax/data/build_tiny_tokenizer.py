"""Builds the bundled tiny tokenizer: ``python -m kptjax.data.build_tiny_tokenizer [OUT]``.

A byte-pair encoding (``tokenizers`` library) of at most ``VOCAB_SIZE`` tokens:

* special tokens with fixed ids ``<pad>``=0, ``<s>``=1, ``</s>``=2, ``<unk>``=3,
  ``<image>``=4, then ``<loc_0>``..``<loc_99>`` (plain added tokens, ids 5..104);
* pre-tokenization: newlines isolated, spaces as ``▁`` attached to the next word
  (never prepended), every digit its own piece (as Llama), so merges never join digits;
* trained on a weighted corpus: the conversation templates (``conversation.TEMPLATE_TEXT``)
  many times, then every built-in spec's (bundled files only, never specs a program
  registered at run time) keypoint names, then their descriptions, so
  template words and names are single tokens;
* an alphabet of letters, digits and common punctuation, so English text round-trips.

Training is deterministic: the same inputs give the same file, which a test checks.
"""

from __future__ import annotations

import json
import pathlib
import string
import sys

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from kptjax.data import conversation, tokenizer as tokenizer_lib
from kptjax.keypoints import get_spec, list_specs

VOCAB_SIZE = 512
ALPHABET = sorted(set(string.ascii_letters + string.digits + " \n.,:;?!'\"()[]-_/+=*%&<>#@$|~"))


def corpus() -> list[str]:
  """Training texts, repeated by weight."""
  names, descriptions, subjects = [], [], set()
  for spec_name in list_specs(builtin_only=True):
    spec = get_spec(spec_name)
    names += list(spec.names)
    descriptions += [d for d in spec.descriptions if d]
    subjects.add(spec.subject)
  names = sorted(set(names))
  descriptions = sorted(set(descriptions))
  texts = []
  for template in sorted(conversation.TEMPLATE_TEXT):
    parts = conversation.TEMPLATE_TEXT[template]
    for key in sorted(parts):
      for subject in sorted(subjects):
        text = parts[key].format(name="{name}", description="{description}", subject=subject)
        texts += [t for t in text.replace("{name}", "\n").replace("{description}", "\n")
                  .split("\n") if t.strip()] * 40
  texts += ["User: ", "Assistant: ", "Reference: "] * 40
  texts += [f" {n}" for n in names] * 10 + [n for n in names] * 10
  texts += [f"{n}?" for n in names] * 5
  texts += descriptions
  return texts


def build() -> str:
  """The tokenizer as a JSON string."""
  specials = list(tokenizer_lib.SPECIAL_TOKENS) + [
      conversation.loc_token(i) for i in range(tokenizer_lib.TINY_LOC_BINS)]
  tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
      pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=True),
      pre_tokenizers.Digits(individual_digits=True),
  ])
  tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="never", split=True)
  trainer = trainers.BpeTrainer(
      vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=specials,
      initial_alphabet=[c if c != " " else "\u2581" for c in ALPHABET],
      limit_alphabet=len(ALPHABET) + 1, show_progress=False)
  tok.train_from_iterator(corpus(), trainer=trainer)
  data = json.loads(tok.to_str())
  for entry in data["added_tokens"]:
    # Location tokens are ordinary vocabulary (kept by decode(skip_special_tokens=True)).
    entry["special"] = entry["content"] in tokenizer_lib.SPECIAL_TOKENS
  if len(data["model"]["vocab"]) > VOCAB_SIZE:
    raise RuntimeError(f"vocab {len(data['model']['vocab'])} > {VOCAB_SIZE}")
  return json.dumps(data, ensure_ascii=False, indent=1, sort_keys=True) + "\n"


def main(argv: list[str]) -> None:
  out = pathlib.Path(argv[1]) if len(argv) > 1 else tokenizer_lib.TINY_TOKENIZER_FILE
  out.parent.mkdir(parents=True, exist_ok=True)
  text = build()
  out.write_text(text, encoding="utf-8")
  print(f"wrote {out} ({len(json.loads(text)['model']['vocab'])} tokens)")


if __name__ == "__main__":
  main(sys.argv)
