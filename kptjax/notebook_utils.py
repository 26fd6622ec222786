"""Helpers shared by the notebooks (``notebooks/walkthrough.ipynb``,
``notebooks/attention_inspection.ipynb``): a checkpoint to look at, one held-out person,
one keypoint question answered by greedy decoding, and the answer's attention over the
image patches.

Checkpoint (``demo_or_tiny_checkpoint``): the demo's training workdir when it exists
(``$KPTJAX_DEMO_WORKDIR``, default ``workdir/demo`` under the repository root, as
``python -m kptjax.demo`` writes it; its config is ``$KPTJAX_DEMO_CONFIG``, default
``configs/demo.py``), else a seconds-long ``configs/demo.py:smoke`` training into a
temporary directory (an untrained model: its answers are mostly noise, but every step
runs). Synthetic data is cached under ``$KPTJAX_DATA_DIR/synthetic``.

    >>> config, workdir, note = demo_or_tiny_checkpoint()
    >>> config, model, params = loading.load_model(config, checkpoint=workdir)
    >>> person = held_out_person(config, index=0)
    >>> answer = ask(config, model, params, tokenizer, person, 'left wrist')
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib
import sys
import tempfile
from typing import Any, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from kptjax import viz
from kptjax.data import pipeline, transforms
from kptjax.inference import decode, parsing
from kptjax.keypoints import get_spec
from kptjax.training import trainer

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO_WORKDIR_ENV = "KPTJAX_DEMO_WORKDIR"
DEMO_CONFIG_ENV = "KPTJAX_DEMO_CONFIG"
DEFAULT_DEMO_WORKDIR = "workdir/demo"
DEFAULT_DEMO_CONFIG = "configs/demo.py"
SMOKE_CONFIG = "configs/demo.py:smoke"


# ---------------------------------------------------------------------------
# Config and checkpoint.


def _resolve(path: str) -> pathlib.Path:
  """A relative path is taken from the repository root (notebooks run in notebooks/)."""
  p = pathlib.Path(path).expanduser()
  return p if p.is_absolute() else REPO_ROOT / p


def load_config(spec: str = DEFAULT_DEMO_CONFIG) -> Any:
  """``'configs/demo.py[:ARG]'`` -> that file's ``get_config(ARG)`` (as ``--config``).

  The repository root goes on ``sys.path`` (config files import ``configs.common``).
  """
  path, _, arg = spec.partition(":")
  file = _resolve(path)
  if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
  module_spec = importlib.util.spec_from_file_location(f"_kptjax_nb_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def is_workdir(path: str | os.PathLike) -> bool:
  """A training workdir with ``model_config.json`` and a ``checkpoints/`` dir."""
  p = pathlib.Path(path)
  return (p / "model_config.json").is_file() and (p / "checkpoints").is_dir() and \
      any((p / "checkpoints").iterdir())


def demo_or_tiny_checkpoint(workdir: Optional[str] = None, tmp_root: Optional[str] = None
                            ) -> tuple[Any, str, str]:
  """(config, workdir, note): the demo's checkpoint, else a smoke one trained now.

  Args:
    workdir: the demo workdir (default ``$KPTJAX_DEMO_WORKDIR`` or ``workdir/demo``;
      relative paths from the repository root).
    tmp_root: where the smoke run's temporary workdir goes (default the system's).
  Returns:
    the config to read data and decode with (``$KPTJAX_DEMO_CONFIG`` or
    ``configs/demo.py`` for the demo's workdir, ``configs/demo.py:smoke`` otherwise),
    the workdir to load with ``kptjax.evaluation.loading.load_model(config, checkpoint=workdir)``,
    and a line saying which one it is.
  """
  path = _resolve(workdir or os.environ.get(DEMO_WORKDIR_ENV) or DEFAULT_DEMO_WORKDIR)
  if is_workdir(path):
    spec = os.environ.get(DEMO_CONFIG_ENV) or DEFAULT_DEMO_CONFIG
    return load_config(spec), str(path), f"checkpoint: {path} (config {spec})"
  config = load_config(SMOKE_CONFIG)
  out = tempfile.mkdtemp(prefix="kptjax_smoke_", dir=tmp_root)
  trainer.run(config, out)
  return config, out, (f"no demo workdir at {path}: trained {SMOKE_CONFIG} for "
                       f"{config.train.num_steps} steps into {out} (an untrained model: "
                       "expect noisy answers; run `python -m kptjax.demo` for a real one)")


# ---------------------------------------------------------------------------
# One held-out person.


@dataclasses.dataclass
class Person:
  """One held-out person as the evaluator sees it.

  Attributes:
    record: the PersonRecord (original-image pixels).
    spec: its KeypointSpec.
    image: uint8[H, W, 3] the original image.
    crop: uint8[S, S, 3] the un-augmented crop (``pipeline.EvalTransform``).
    model_input: f32[S, S, 3] the normalized crop the model reads.
    affine_inv: f32[2, 3] crop px -> original-image px.
    keypoints_crop: f32[K, 3] the ground truth in crop px (x, y, visibility).
  """
  record: Any
  spec: Any
  image: np.ndarray
  crop: np.ndarray
  model_input: np.ndarray
  affine_inv: np.ndarray
  keypoints_crop: np.ndarray


def held_out_person(config: Any, index: int = 0, records: Any = None) -> Person:
  """Person ``index`` of ``config.data.eval`` (the held-out synthetic set), cropped by
  the eval pipeline's transform."""
  records = pipeline.load_records(config, "eval") if records is None else records
  item = pipeline.EvalTransform(config, records)(index)
  rec = records[index]
  affine_inv = np.asarray(item["affine_inv"], np.float32)
  kp = np.asarray(rec.keypoints, np.float32)[:, [0, 1, -1]].copy()
  kp[:, :2] = transforms.apply_affine(kp[:, :2], transforms.invert_affine(affine_inv))
  return Person(record=rec, spec=(getattr(records, "specs", {}) or {}).get(rec.spec)
                or get_spec(rec.spec),
                image=transforms.load_record_image(rec),
                crop=viz.denormalize(item["image"], config.data.normalization),
                model_input=np.asarray(item["image"], np.float32),
                affine_inv=affine_inv, keypoints_crop=kp)


# ---------------------------------------------------------------------------
# One question, greedy-decoded.


@dataclasses.dataclass
class Answer:
  """A greedy answer to one keypoint question.

  Attributes:
    name: the keypoint asked for.
    prompt: int32[Tp + Tq] the prompt (``encode_prefix`` + ``encode_query``).
    generated: int32[A] the generated tokens up to and including the stop token.
    probs: f32[A] each generated token's probability.
    text: the answer text (tokens before the stop token).
    ok: whether it parsed.
    values: f32[2] normalized crop coordinates (the crop center when not parsed).
    xy_crop: f32[2] crop pixels; xy_image: f32[2] original-image pixels.
    score: the LocLLM confidence (0 when not parsed).
  """
  name: str
  prompt: np.ndarray
  generated: np.ndarray
  probs: np.ndarray
  text: str
  ok: bool
  values: np.ndarray
  xy_crop: np.ndarray
  xy_image: np.ndarray
  score: float

  @property
  def sequence(self) -> np.ndarray:
    """int32[T] prompt + generated tokens: the full forward's input."""
    return np.concatenate([self.prompt, self.generated]).astype(np.int32)


def ask(config: Any, model: Any, params: Any, tokenizer: Any, person: Person,
        names: Sequence[str] | str, *, constrained: Optional[bool] = None,
        max_new_tokens: Optional[int] = None) -> list[Answer]:
  """Asks for each keypoint in ``names`` about ``person`` (``kptjax.inference.decode.Localizer``:
  the cached greedy decoder, prompts from the training templates). One Answer per name.

  ``constrained`` / ``max_new_tokens`` override ``config.decode``; with ``constrained``
  the budget is raised to what the coordinate grammar needs (15 for ``[0.ddd,0.ddd]``)."""
  names = [names] if isinstance(names, str) else list(names)
  fmt = config.data.coord_format
  if constrained and max_new_tokens is None and fmt in parsing.ANSWER_SHAPES:
    # The grammar's worst case: a leading space, one token per character, the stop token.
    max_new_tokens = max(int(config.decode.max_new_tokens),
                         len(parsing.ANSWER_SHAPES[fmt]) + 2)
  descriptions = [person.spec.description_of(n) if config.data.use_descriptions else None
                  for n in names]
  loc = decode.Localizer(config, model, params, tokenizer, names, descriptions,
                         subject=person.spec.subject, constrained=constrained,
                         max_new_tokens=max_new_tokens)
  tokens, probs, lengths = loc.decode(person.model_input[None])
  result = parsing.localize(tokens, probs, loc.scorer, loc.count, person.affine_inv[None],
                            loc.crop_size)
  rows, row_lengths = loc.prompts.full_rows()
  side = float(config.model.vit.image_size)
  out = []
  for q, name in enumerate(names):
    n = int(lengths[0, q])
    values = np.asarray(result.values[0, q, :2], np.float32)
    out.append(Answer(name=name, prompt=rows[q, :row_lengths[q]],
                      generated=tokens[0, q, :n], probs=probs[0, q, :n],
                      text=result.texts[0][q], ok=not result.missing[0, q], values=values,
                      xy_crop=values * side, xy_image=result.keypoints[0, q],
                      score=float(result.scores[0, q])))
  return out


# ---------------------------------------------------------------------------
# Attention over the image patches.


def image_attention(model: Any, params: Any, person: Person, answer: Answer,
                    image_token_id: int, token_strs: Sequence[Optional[str]]
                    ) -> tuple[np.ndarray, list[int], str]:
  """How the answer's coordinate digits looked at the image, per layer.

  One teacher-forced forward of prompt + answer (``VLM.__call__(...,
  return_attention=True)``). The digits are those after ``0.`` in the numbers the
  parser reads (``parsing.COORD_RE``; the leading ``0.`` is the same in every answer).
  A token is generated from the position before it, so the rows read are those
  *predicting* each digit (all generated tokens when the answer has no number).

  Returns:
    f32[L, N] attention to the N image patches (mean over heads and those rows; each
    row's weights over all T positions sum to 1), the row positions used, and which
    tokens they predict ('digits' or 'all answer tokens').
  """
  seq = answer.sequence
  logits, attn = model.apply({"params": params}, jnp.asarray(person.model_input[None]),
                             jnp.asarray(seq[None]), jnp.ones((1, len(seq)), bool),
                             return_attention=True)
  del logits
  attn = np.asarray(attn)[:, 0]                          # [L, H, T, T]
  owners, text = [], ""
  for i, t in enumerate(answer.generated):               # character -> generated token
    piece = token_strs[int(t)] or ""
    text += piece
    owners += [i] * len(piece)
  fraction = sorted({owners[c] for m in parsing.COORD_RE.finditer(text)
                     for c in range(m.start() + 2, m.end())})
  start = len(answer.prompt)
  digits, which = [start + i for i in fraction], "digits"
  if not digits:
    digits, which = [start + i for i in range(len(answer.generated))], "all answer tokens"
  rows = [p - 1 for p in digits]
  patches = np.flatnonzero(seq == int(image_token_id))
  per_layer = attn[:, :, rows][..., patches].mean(axis=(1, 2))   # [L, N]
  return per_layer.astype(np.float32), rows, which


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
  """uint8[H, W, 3] -> uint8[H * factor, W * factor, 3] (nearest), for display."""
  return np.repeat(np.repeat(np.asarray(image), factor, axis=0), factor, axis=1)


def _targets(loss_mask: Sequence[float], n: int) -> np.ndarray:
  """bool[n]: token i is a loss target (``loss_mask[i - 1]``: the mask sits on the
  position that predicts the next token)."""
  target = np.zeros(n, bool)
  target[1:] = np.asarray(loss_mask[:n - 1], np.float32) > 0
  return target


def token_table(tokenizer: Any, tokens: Sequence[int], loss_mask: Sequence[float],
                image_token_id: int, input_mask: Optional[Sequence[bool]] = None,
                max_rows: Optional[int] = None) -> str:
  """Tokens of a training sequence, one per line: position, id, text, and ``*`` on the
  tokens the loss is on (shown beside the predicted token; ``loss_mask`` itself is set
  on the position before it). Runs of image placeholders are folded into one line;
  ``max_rows`` cuts the table."""
  tokens = [int(t) for t in tokens]
  n = int(np.sum(input_mask)) if input_mask is not None else len(tokens)
  target = _targets(loss_mask, n)
  lines = ["  pos    id  loss  token", "  ---  ----  ----  -----"]
  i = 0
  while i < n:
    if max_rows is not None and len(lines) - 2 >= max_rows:
      lines.append(f"  ... {n - i} more tokens")
      break
    if tokens[i] == image_token_id:
      j = i
      while j < n and tokens[j] == image_token_id:
        j += 1
      lines.append(f"  {i:3d}  {tokens[i]:4d}        <image> x {j - i} (pos {i}..{j - 1})")
      i = j
      continue
    text = tokenizer.decode([tokens[i]], skip_special_tokens=False)
    lines.append(f"  {i:3d}  {tokens[i]:4d}  {'  * ' if target[i] else '    '}  {text!r}")
    i += 1
  return "\n".join(lines)


def masked_text(tokenizer: Any, tokens: Sequence[int], loss_mask: Sequence[float],
                image_token_id: int, input_mask: Optional[Sequence[bool]] = None) -> str:
  """The sequence as text with the loss targets in ``«...»`` and the image placeholders
  folded: ``<s><image>*64left wrist?«[0.412,0.733]</s>»left ear?«...»``."""
  tokens = [int(t) for t in tokens]
  n = int(np.sum(input_mask)) if input_mask is not None else len(tokens)
  target = _targets(loss_mask, n)
  out, i = [], 0
  while i < n:
    j = i
    if tokens[i] == image_token_id:
      while j < n and tokens[j] == image_token_id:
        j += 1
      out.append(f"<image>*{j - i}")
    else:
      while j < n and tokens[j] != image_token_id and target[j] == target[i]:
        j += 1
      text = tokenizer.decode(tokens[i:j], skip_special_tokens=False)
      out.append(f"«{text}»" if target[i] else text)
    i = j
  return "".join(out)
