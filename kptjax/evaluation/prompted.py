"""Prompted keypoint questions (KptLLM / CapeLLM) under the MP-100 protocol: every query
instance, every keypoint labeled in the query (and, for visual prompts, in a support),
one question each; PCK@0.2 (normalized by max(box w, h)) per instance, then its mean
over instances, as POMNet / CapeFormer do, and per category (``metrics.category_pck``).
A question not asked or not answered is a miss.

  task 'visual'   1- or 5-shot: supports from ``cape.sample_supports(records, shots,
                  seed)`` (seeded: the same supports for every checkpoint); the prompt of
                  each keypoint averages the shots that label it.
  task 'textual'  the keypoint's name and description only (CapeLLM's setting, and
                  KptLLM's on AP-10K).
  semantic        ``evaluate_semantic``: the keypoint marked on the image itself; the
                  answer must be its description (accuracy, KptLLM Table 1).

Where the protocol has OKS AP (AP-10K: ``protocols.Protocol.oks_ap``) it is added.

Answers come from ``decode.generate_keypoints`` (the one Decoder): the ``<keypoint>``
head (coord_format 'keypoint_token') or LocLLM's decimal text ('decimal2d', parsed with
``parsing.parse_values``), so the two decodings compare on one model. The questions of
one query share its image prefix (``prefix_len``: the image header is prefilled once per
query, ``config.decode.share_prefix``). An unparseable answer, or a question whose query
or support image cannot be read (``errors.ImageError``), is missing: a miss in PCK and in
OKS, counted (``parse_failures``, ``missing_keypoints``, ``image_errors``,
``unreadable_images``). Crops are the eval pipeline's (``transforms.CropRecipe``);
predictions go back to image pixels through the crop's inverse affine.

    >>> result = evaluate_cape(config, model, params, tokenizer, records, task="visual",
    ...                        shots=1, seed=0)
    >>> result["PCK@0.2"], result["per_category"]
"""

from __future__ import annotations

import itertools
from typing import Any, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from kptjax import distributed, errors
from kptjax.data import cape, transforms
from kptjax.data.conversation import VISUAL_TASKS
from kptjax.data.sources import specs_of
from kptjax.data.tasks.kptllm import TaskEncoder
from kptjax.evaluation import metrics, oks, protocols
from kptjax.inference import decode, parsing
from kptjax.models import vlm

COORD_FORMATS = ("keypoint_token", "decimal2d")


def _crop_view(recipe: transforms.CropRecipe, record: Any, spec: Any) -> dict[str, np.ndarray]:
  """The eval crop of ``record`` (``CropRecipe``, no augmentation): 'image' f32[S, S, 3]
  normalized, 'affine_inv' f32[2, 3], 'xy' f32[K, 2] crop px, 'labeled' bool[K]
  (labeled and inside the crop)."""
  crop = recipe(record, spec)
  return dict(image=crop["image"], affine_inv=np.asarray(crop["affine_inv"], np.float32),
              xy=crop["keypoints"][:, :2], labeled=crop["keypoints"][:, 2] > 0)


def questions(config: Any, records: Sequence[Any], task: str, shots: int,
              seed: int, queries: Optional[range] = None) -> Iterator[dict[str, Any]]:
  """One dict per (query, keypoint), query-major: the query crop ('image' f32[S, S, 3],
  'affine_inv' f32[2, 3]), its supports' crops ('support_image' f32[shots, S, S, 3]) and
  the keypoint's position in each ('support_xy' f32[shots, 2] normalized,
  'support_mask' f32[shots]), 'index', 'keypoint', 'spec'; or 'image_error' instead of
  the crops when an image cannot be read. ``queries``: only these query indices (a
  process's block; the support draw is the whole set's either way)."""
  recipe = transforms.CropRecipe.from_config(config)     # the eval pipeline's crop
  specs = specs_of(records)
  side = recipe.side
  draws = cape.sample_supports(records, shots, seed) if task in VISUAL_TASKS else \
      [(q, ()) for q in range(len(records))]
  for q, support_ids in draws:
    if queries is not None and q not in queries:
      continue
    record = records[q]
    spec = specs[record.spec]
    labeled = np.asarray(record.keypoints)[:, -1] > 0
    if task in VISUAL_TASKS:
      labeled &= cape.support_keypoint_mask(record, [records[i] for i in support_ids])
    try:
      query = _crop_view(recipe, record, spec)
      supports = [_crop_view(recipe, records[i], specs[records[i].spec]) for i in support_ids]
    except errors.ImageError as e:           # every question of this query is missing
      logging.warning("query %d: %s; its %d questions are scored as missing", q, e,
                      int(labeled.sum()))
      for k in np.flatnonzero(labeled):
        yield dict(index=q, keypoint=int(k), spec=spec, image_error=str(e.path))
      continue
    if task == "semantic":                   # the model names a keypoint marked on its image
      shots, supports = 1, [query]
    n = max(shots, 1)
    for k in np.flatnonzero(labeled):
      xy, mask = np.zeros((n, 2), np.float32), np.zeros((n,), np.float32)
      images = np.zeros((n, side, side, 3), np.float32)
      for j, s in enumerate(supports):
        images[j] = s["image"]
        if s["labeled"][k]:                   # labeled and inside the support crop
          xy[j], mask[j] = s["xy"][k] / side, 1.0
      yield dict(index=q, keypoint=int(k), spec=spec, image=query["image"],
                 affine_inv=query["affine_inv"], support_image=images, support_xy=xy,
                 support_mask=mask)


def answer_text(tokenizer: Any, tokens: np.ndarray, eos_id: int) -> str:
  """The generated answer's text: its tokens up to the end of turn."""
  ids = [int(t) for t in tokens]
  ids = ids[:ids.index(eos_id)] if eos_id in ids else ids
  return tokenizer.decode(ids, skip_special_tokens=True)


def _parse(tokenizer: Any, tokens: np.ndarray, eos_id: int) -> Optional[np.ndarray]:
  """(x, y) of a decimal answer (tokens up to the end of turn); None when unparseable."""
  values, _ = parsing.parse_values(answer_text(tokenizer, tokens, eos_id), 2)
  return None if values is None else np.asarray(values[:2], np.float32)


def task_encoder(config: Any, tokenizer: Any) -> TaskEncoder:
  """The training task encoder of ``config`` (prompts, ``<keypoint>``, image slots)."""
  kpt = config.model.kpt
  return TaskEncoder(tokenizer, config.data, vlm.num_image_tokens(config.model),
                     prompt_token_id=kpt.prompt_token_id,
                     keypoint_token_id=kpt.keypoint_token_id,
                     image_token_id=config.model.get("image_token_id", None))


def _stack(rows: Sequence[dict[str, Any]], key: str) -> jax.Array:
  return jnp.asarray(np.stack([r[key] for r in rows]))


def _person_batches(items: Iterator[dict], queries: int, persons: int
                    ) -> Iterator[tuple[list[dict], list[list[dict]]]]:
  """(image-error questions, at most ``persons`` groups of at most ``queries``
  questions of one query each); a query with more questions is split."""
  failed, groups = [], []
  for _, group in itertools.groupby(items, key=lambda x: x["index"]):
    group = list(group)
    failed += [g for g in group if "image_error" in g]
    group = [g for g in group if "image_error" not in g]
    for chunk in (group[i:i + queries] for i in range(0, len(group), queries)):
      groups.append(chunk)
      if len(groups) == persons:
        yield failed, groups
        failed, groups = [], []
  if failed or groups:
    yield failed, groups


def answers(config: Any, model: Any, params: Any, tokenizer: Any,
            items: Iterator[dict[str, Any]], task: str, *, rows_per_batch: int,
            max_keypoints: int, max_new_tokens: int, force_keypoint: bool
            ) -> Iterator[tuple[dict[str, Any], Optional[np.ndarray], Optional[np.ndarray]]]:
  """(question, xy f32[2] normalized crop units, generated tokens i32[M]) per question of
  ``items``; (question, None, None) for an image-error question.

  Every batch holds P = rows_per_batch // Q queries of Q = min(rows_per_batch,
  ``max_keypoints``) rows (a query's questions padded by repeating its last one, the
  batch by repeating its last query; copies dropped), so one program serves the run.
  The questions of one query share its image prefix (one crop per query,
  ``prefix_len``) when ``config.decode.share_prefix`` and the prefix holds no prompt
  slot; else each row carries its crop."""
  enc = task_encoder(config, tokenizer)
  prefix, max_len = enc.prefix(), int(config.data.max_len) or 512
  share = bool(config.decode.get("share_prefix", True)) and \
      int(config.model.kpt.prompt_token_id) not in prefix
  embed = None
  if task != "textual":
    apply = jax.jit(lambda p, i, x, m: model.apply({"params": p}, i, x, m,
                                                   method="embed_prompts"))
    embed = lambda rows: apply(params, _stack(rows, "support_image"),
                               _stack(rows, "support_xy")[:, :, None],
                               _stack(rows, "support_mask")[:, :, None])
  # One batch shape for the whole run (one compilation): P groups of Q rows.
  q = max(1, min(rows_per_batch, max_keypoints))
  p = max(1, rows_per_batch // q)
  for failed, groups in _person_batches(items, q, p):
    for row in failed:
      yield row, None, None
    if not groups:
      continue
    padded = [g + [g[-1]] * (q - len(g)) for g in groups]
    padded += [padded[-1]] * (p - len(padded))
    rows = [r for g in padded for r in g]
    tokens = np.full((len(rows), max_len), enc.pad_id, np.int32)
    mask = np.zeros((len(rows), max_len), bool)
    for i, row in enumerate(rows):
      spec, k = row["spec"], row["keypoint"]
      ids = prefix + enc.task_query(task, spec.names[k], spec.descriptions[k], spec.subject)
      if len(ids) > max_len:
        raise errors.ConfigError(f"data.max_len={max_len} is shorter than a question "
                                 f"({len(ids)})")
      tokens[i, :len(ids)], mask[i, :len(ids)] = ids, True
    images = [g[0] for g in padded] if share else rows
    xy, generated = decode.generate_keypoints(
        model, params, _stack(images, "image"), tokens, mask,
        prompt_embeds=None if embed is None else embed(rows), max_new_tokens=max_new_tokens,
        eos_id=enc.eos_id, force_keypoint=force_keypoint,
        prefix_len=len(prefix) if share else 0)
    at = 0
    for group, pad in zip(groups, padded):
      for j, row in enumerate(group):
        yield row, None if xy is None else np.asarray(xy[at + j]), \
            None if generated is None else np.asarray(generated[at + j])
      at += len(pad)


def _check(config: Any, model: Any, task: str, allowed: Sequence[str]) -> None:
  if task not in allowed:
    raise errors.ConfigError(f"prompted evaluation: task {task!r} (expected one of "
                             f"{list(allowed)})")
  if task != "textual" and model is not None and not hasattr(model, "embed_prompts"):
    raise errors.ConfigError(f"the {task} task needs a KptLLM model (model.kpt.enabled)")


def evaluate_cape(config: Any, model: Any, params: Any, tokenizer: Any,
                  records: Sequence[Any], *, task: str = "visual", shots: int = 1,
                  seed: int = 0, rows_per_batch: int = 16, threshold: float = 0.2,
                  max_new_tokens: Optional[int] = None,
                  coco_gt: Optional[str] = None,
                  protocol: Optional[protocols.Protocol] = None) -> dict[str, Any]:
  """PCK@threshold per category and mean (module docstring).

  Args:
    config: the full config (model.kpt, data: template, coord_format, padding,
      normalization, max_len; decode.share_prefix).
    model, params: ``KptLLM`` (or a ``VLM`` for the textual task) and its params;
      tokenizer: the model's tokenizer.
    records: the test instances (e.g. ``read_mp100`` of ``mp100_split{k}_test.json``).
    task: 'visual', 'visual+textual' (KptLLM Table 7: support prompt and description) or
      'textual'.
    shots: supports per query (visual tasks).
    seed: the support draw.
    rows_per_batch: questions decoded together.
    max_new_tokens: default ``config.decode.max_new_tokens``.
    coco_gt: the records' COCO file, for OKS AP too (one keypoint spec with OKS sigmas;
      only the records' images are evaluated, so a family split scores alone).
    protocol: the OKS AP setting (default ``protocols.protocol_for(records)``).

  Returns:
    ``metrics.category_pck``'s dict plus 'questions' (keypoints asked), the missing
    counts (``protocols.missing_counts``), and with ``coco_gt`` the COCO AP/AR names.
  """
  _check(config, model, task, VISUAL_TASKS + ("textual",))
  fmt = config.data.coord_format
  if fmt not in COORD_FORMATS:
    raise errors.ConfigError(f"evaluate_cape: coord_format {fmt!r} (expected one of "
                             f"{list(COORD_FORMATS)})")
  regress = fmt == "keypoint_token"
  eos_id = task_encoder(config, tokenizer).eos_id
  side = int(config.model.vit.image_size)
  k_max = max(r.num_keypoints for r in records)
  pred = np.zeros((len(records), k_max, 2))
  visible = np.zeros((len(records), k_max), bool)    # asked
  missing = np.zeros((len(records), k_max), bool)    # asked, no answer
  unreadable: dict[int, str] = {}                    # query index -> unreadable image
  # Several processes: each asks its block of queries; process 0 gathers the answers
  # (as JSON rows [query, keypoint, state, x, y, error]) and scores them.
  block = distributed.split_for_process(len(records))
  answered = []
  for row, xy, generated in answers(
      config, model, params, tokenizer,
      questions(config, records, task, shots, seed, range(block.start, block.stop)), task,
      rows_per_batch=rows_per_batch, max_keypoints=k_max, force_keypoint=regress,
      max_new_tokens=int(max_new_tokens or config.decode.max_new_tokens)):
    n, k = int(row["index"]), int(row["keypoint"])
    if "image_error" in row:
      answered.append([n, k, "unreadable", 0.0, 0.0, row["image_error"]])
      continue
    p = xy if regress else _parse(tokenizer, generated, eos_id)
    if p is None or not np.isfinite(p).all():
      answered.append([n, k, "missing", 0.0, 0.0, ""])
      continue
    x, y = transforms.apply_affine(np.asarray(p)[None] * side, row["affine_inv"])[0]
    answered.append([n, k, "answer", float(x), float(y), ""])
  answered = distributed.gather_to_process0(answered)
  if answered is None:                 # not process 0: its answers are with process 0
    return {}
  for n, k, state, x, y, error in answered:
    visible[n, k] = True
    if state == "unreadable":
      missing[n, k], unreadable[n] = True, error
    elif state == "missing":
      missing[n, k] = True
    else:
      pred[n, k] = (x, y)
  gt = np.zeros((len(records), k_max, 2))
  for i, r in enumerate(records):
    gt[i, :r.num_keypoints] = np.asarray(r.keypoints)[:, :2]
  boxes = np.stack([np.asarray(r.box, np.float64) for r in records])
  result = metrics.category_pck(pred, gt, visible, boxes,
                                [r.category or r.spec for r in records], threshold,
                                missing=missing)
  broken = np.zeros(len(records), bool)
  broken[list(unreadable)] = True
  result["questions"] = int(visible.sum())
  result.update(protocols.missing_counts(missing, visible, broken, list(unreadable.values())))
  if coco_gt:
    protocol = protocol or protocols.protocol_for(records)
    result.update(_coco_ap(coco_gt, records, pred, missing | ~visible,
                           protocol.oks_ap or "coco"))
  return result


def _coco_ap(coco_gt: str, records: Sequence[Any], pred: np.ndarray, missing: np.ndarray,
             ap_protocol: str) -> dict[str, float]:
  """OKS AP of the predictions f32[N, K, 2], one result per instance (score 1) on its
  own image, in the instance's own category; ``missing`` bool[N, K] keypoints not asked
  or not answered. The images are those of the records' categories
  (``oks.coco_keypoint_ap``), so a family split scores alone."""
  spec = protocols.keypoint_spec(records, what="OKS AP")
  if spec.sigmas is None:
    raise errors.ConfigError(f"OKS AP needs a keypoint spec with sigmas; {spec.name} has none")
  category = protocols.category_ids(coco_gt, records)
  k = spec.num_keypoints
  results = [oks.coco_result(r.image_id, np.concatenate([pred[i, :k], np.ones((k, 1))], 1),
                             1.0, category[int(r.ann_id)], missing=missing[i, :k])
             for i, r in enumerate(records)]
  return oks.coco_keypoint_ap(coco_gt, results, spec.sigmas,
                              category_ids=sorted(set(category.values())),
                              protocol=ap_protocol)


def _normalize(text: str) -> str:
  return " ".join(text.lower().replace(".", " ").split())


def evaluate_semantic(config: Any, model: Any, params: Any, tokenizer: Any,
                      records: Sequence[Any], *, rows_per_batch: int = 16,
                      max_new_tokens: Optional[int] = None) -> dict[str, Any]:
  """Keypoint semantic understanding (KptLLM Table 1): for every labeled keypoint, the
  image with that keypoint as the prompt; correct when the generated answer is the
  keypoint's description (case, spaces and full stops aside).

  Returns:
    {'accuracy': over all questions, 'per_category': {name: accuracy}, 'questions': n,
    and the missing counts of :func:`evaluate_cape` (a question whose image cannot be
    read is missing and wrong; text answers have nothing to parse, so
    ``parse_failures`` is 0)}.
  """
  if not hasattr(model, "embed_prompts"):
    raise errors.ConfigError("evaluate_semantic needs a KptLLM model (model.kpt.enabled)")
  eos_id = task_encoder(config, tokenizer).eos_id
  hits: dict[str, list[bool]] = {}
  unreadable: dict[int, str] = {}
  missing = 0
  for row, _, generated in answers(
      config, model, params, tokenizer, questions(config, records, "semantic", 1, 0),
      "semantic", rows_per_batch=rows_per_batch, force_keypoint=False,
      max_keypoints=max(r.num_keypoints for r in records),
      max_new_tokens=int(max_new_tokens or config.decode.max_new_tokens)):
    spec = row["spec"]
    if "image_error" in row:                 # unreadable image: a wrong answer
      hits.setdefault(spec.subject, []).append(False)
      unreadable.setdefault(row["index"], row["image_error"])
      missing += 1
      continue
    text = answer_text(tokenizer, generated, eos_id)
    truth = spec.descriptions[row["keypoint"]]
    hits.setdefault(spec.subject, []).append(_normalize(text) == _normalize(truth))
  flat = [h for v in hits.values() for h in v]
  return {"accuracy": float(np.mean(flat)) if flat else float("nan"),
          "per_category": {c: float(np.mean(v)) for c, v in sorted(hits.items())},
          "questions": len(flat), "num_answers": len(flat) - missing, "parse_failures": 0,
          "parse_failure_rate": 0.0, "missing_keypoints": missing,
          "image_errors": len(unreadable), "unreadable_images": sorted(set(unreadable.values()))}
