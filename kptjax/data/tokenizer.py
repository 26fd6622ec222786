"""Tokenizers: a Hugging Face checkpoint's, or the tiny one bundled with kptjax.

``load_tokenizer('')`` returns the bundled tiny tokenizer
(``kptjax/data/assets/tiny_tokenizer.json``, built by
``python -m kptjax.data.build_tiny_tokenizer``): a byte-pair encoding of at most 512
tokens trained on the conversation templates and every keypoint name and description
of the built-in specs, so template words are single tokens and a round is short. Its
special tokens have fixed ids: ``<pad>``=0, ``<s>``=1, ``</s>``=2, ``<unk>``=3,
``<image>``=4, then the location tokens ``<loc_0>``..``<loc_99>`` = 5..104 (for
``coord_format='loc_tokens'``). Digits are split one token per digit, as in Llama, so
``[0.412,0.733]`` is 13 tokens. Characters outside its alphabet become ``<unk>``.

``load_tokenizer(path)`` loads a checkpoint dir with ``AutoTokenizer`` (fast
tokenizers; ``LlamaTokenizer(vocab_file=...)`` builds an empty tokenizer in
transformers v5). A missing pad token falls back to the end-of-sequence token.
"""

from __future__ import annotations

import os
import pathlib
from typing import Union

from kptjax.errors import ConfigError

ASSETS = pathlib.Path(__file__).resolve().parent / "assets"
TINY_TOKENIZER_FILE = ASSETS / "tiny_tokenizer.json"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")   # ids 0..4
TINY_LOC_BINS = 100                                             # <loc_i>: ids 5..104
# A plain chat template for the tiny tokenizer (template 'chat' on the CPU path).
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "User: {{ m['content'] }}\nAssistant: {% else %}{{ m['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}")


def load_tokenizer(path: Union[str, os.PathLike] = "", *, loc_bins: int = 0):
  """A ``transformers.PreTrainedTokenizerFast``.

  Args:
    path: a Hugging Face checkpoint dir (or a ``tokenizer.json`` file); '' = the
      bundled tiny tokenizer.
    loc_bins: make sure ``<loc_0>``..``<loc_{loc_bins-1}>`` exist (added to an HF
      tokenizer when missing; the model's vocabulary must then cover them).
  """
  # Lazy: transformers imports torch when it is installed (tens of seconds on a loaded CPU);
  # readers, synthetic data and grain workers that never tokenize do not pay for it.
  from transformers import (  # pylint: disable=g-import-not-at-top
      AutoTokenizer,
      PreTrainedTokenizerFast,
  )
  path = str(path or "")
  if not path:
    if not TINY_TOKENIZER_FILE.exists():
      raise ConfigError(f"bundled tokenizer missing: {TINY_TOKENIZER_FILE}; run "
                        "python -m kptjax.data.build_tiny_tokenizer")
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(TINY_TOKENIZER_FILE), pad_token="<pad>", bos_token="<s>",
        eos_token="</s>", unk_token="<unk>", extra_special_tokens=["<image>"],
        model_max_length=1 << 20)
    tok.chat_template = TINY_CHAT_TEMPLATE
    if loc_bins > TINY_LOC_BINS:
      raise ConfigError(f"the tiny tokenizer has {TINY_LOC_BINS} location tokens, "
                        f"asked for {loc_bins}")
    return tok
  if path.endswith(".json") and os.path.isfile(path):
    tok = PreTrainedTokenizerFast(tokenizer_file=path)
  elif os.path.isdir(path):
    tok = AutoTokenizer.from_pretrained(path)
  else:
    raise ConfigError(f"tokenizer path {path!r} is neither a checkpoint dir nor a "
                      "tokenizer.json file")
  if not getattr(tok, "is_fast", False):
    raise ConfigError(f"{path}: only fast tokenizers (tokenizer.json) are supported")
  if tok.pad_token is None and tok.eos_token is not None:
    tok.pad_token = tok.eos_token
  if loc_bins:
    missing = [f"<loc_{i}>" for i in range(loc_bins) if f"<loc_{i}>" not in tok.get_vocab()]
    if missing:
      tok.add_tokens(missing)
  return tok
