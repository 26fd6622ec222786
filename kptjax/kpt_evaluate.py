"""KptLLM under the MP-100 protocol: every query instance, every keypoint labeled in the
query (and, for visual prompts, in a support), one question each; PCK@0.2 (normalized by
max(box w, h)) per instance, then its mean over instances, as POMNet / CapeFormer do, and
per category (``metrics.category_pck``). A question not asked or not answered is a miss.

  task 'visual'   1- or 5-shot: supports from ``cape.sample_supports(records, shots,
                  seed)`` (seeded: the same supports for every checkpoint); the prompt of
                  each keypoint averages the shots that label it.
  task 'textual'  the keypoint's name and description only (CapeLLM's setting, and
                  KptLLM's on AP-10K).
  semantic        ``evaluate_semantic``: the keypoint marked on the image itself; the
                  answer must be its description (accuracy, KptLLM Table 1).

On AP-10K (``kptllm_ap10k.py``) the CLI adds OKS AP (CLAMP's and KptLLM's metric).

Answers come from ``kpt_decode.generate_keypoints``: the ``<keypoint>`` head (coord_format
'keypoint_token') or LocLLM's decimal text (``'decimal2d'``, parsed with
``parsing.parse_values``) — so the two decodings compare on one model. An unparseable
answer, or a question whose query or support image cannot be read
(``errors.ImageError``), is missing: a miss in PCK and in OKS, counted in the result
(``parse_failures``, ``parse_failure_rate``, ``missing_keypoints``, ``image_errors``,
``unreadable_images``). A plain ``VLM`` (CapeLLM: textual task, capellm template) is
evaluated the same way with decimal answers. Predictions go back to image pixels
through the crop's inverse affine.

    >>> result = evaluate_cape(config, model, params, tokenizer, records, task="visual",
    ...                        shots=1, seed=0)
    >>> result["PCK@0.2"], result["per_category"]

CLI (``config.data.eval`` is the test split; ``--checkpoint`` a training workdir)::

    python -m kptjax.kpt_evaluate --config configs/kptllm_mp100.py:split=1 \
        --checkpoint WORKDIR --task visual --shots 5 --out WORKDIR/eval_split1_5shot

writes ``OUT/metrics.json`` with its ``provenance`` (``kptjax.evaluation.provenance``); an existing
one is read, not recomputed, when its provenance is this run's (else it is recomputed,
logged).
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from kptjax import errors, evaluate, storage
from kptjax.data import cape, conversation, kpt_tasks, pipeline, transforms
from kptjax.errors import ConfigError
from kptjax.evaluation import metrics
from kptjax.inference import kpt_decode, parsing
from kptjax.models import factory


def _crop(config: Any, record: Any, spec: Any) -> dict[str, np.ndarray]:
  side = int(config.model.vit.image_size)
  crop = transforms.crop_person(record, transforms.load_record_image(record), (side, side),
                                padding=float(config.data.padding), spec=spec)
  return dict(image=transforms.normalize_image(crop["image"], config.data.normalization)
              .astype(np.float32), keypoints=crop["keypoints"], affine_inv=crop["affine_inv"])


def _questions(config: Any, records: Sequence[Any], task: str, shots: int,
               seed: int) -> Iterator[dict[str, Any]]:
  """One dict per (query, keypoint): the query crop, its supports' crops and the
  keypoint's position in each support (normalized), and what to score it against."""
  specs = pipeline._specs_for(records)   # pylint: disable=protected-access
  side = int(config.model.vit.image_size)
  draws = cape.sample_supports(records, shots, seed) if task == "visual" else \
      [(q, ()) for q in range(len(records))]
  for q, support_ids in draws:
    record = records[q]
    spec = specs[record.spec]
    labeled = np.asarray(record.keypoints)[:, -1] > 0
    if task == "visual":
      labeled &= cape.support_keypoint_mask(record, [records[i] for i in support_ids])
    try:
      query = _crop(config, record, spec)
      supports = [_crop(config, records[i], specs[records[i].spec]) for i in support_ids]
    except errors.ImageError as e:           # every question of this query is missing
      logging.warning("query %d: %s; its %d questions are scored as missing", q, e,
                      int(labeled.sum()))
      for k in np.flatnonzero(labeled):
        yield dict(index=q, keypoint=int(k), spec=spec, image_error=str(e.path))
      continue
    if task == "semantic":                   # the model names a keypoint marked on its image
      shots, supports = 1, [query]
    for k in np.flatnonzero(labeled):
      xy = np.zeros((max(shots, 1), 2), np.float32)
      mask = np.zeros((max(shots, 1),), np.float32)
      images = np.zeros((max(shots, 1), side, side, 3), np.float32)
      for j, s in enumerate(supports):
        images[j] = s["image"]
        if s["keypoints"][k, 2] > 0:          # labeled and inside the support crop
          xy[j], mask[j] = s["keypoints"][k, :2] / side, 1.0
      yield dict(index=q, keypoint=int(k), spec=spec, image=query["image"],
                 affine_inv=query["affine_inv"], support_image=images, support_xy=xy,
                 support_mask=mask)


def _answer_text(tokenizer: Any, tokens: np.ndarray, eos_id: int) -> str:
  """The generated answer's text: its tokens up to the end of turn."""
  ids = [int(t) for t in tokens]
  ids = ids[:ids.index(eos_id)] if eos_id in ids else ids
  return tokenizer.decode(ids, skip_special_tokens=True)


def _parse(tokenizer: Any, tokens: np.ndarray, eos_id: int) -> Optional[np.ndarray]:
  """(x, y) of a decimal answer (tokens up to the end of turn); None when unparseable."""
  values, _ = parsing.parse_values(_answer_text(tokenizer, tokens, eos_id), 2)
  return None if values is None else np.asarray(values[:2], np.float32)


def _task_encoder(config: Any, tokenizer: Any) -> kpt_tasks.TaskEncoder:
  kpt = config.model.kpt
  return kpt_tasks.TaskEncoder(tokenizer, config.data,
                               conversation.num_image_tokens(config.model),
                               prompt_token_id=kpt.prompt_token_id,
                               keypoint_token_id=kpt.keypoint_token_id,
                               image_token_id=config.model.get("image_token_id", None))


def _stack(rows: Sequence[dict[str, Any]], key: str) -> jax.Array:
  return jnp.asarray(np.stack([r[key] for r in rows]))


def _encode_batch(batch: Sequence[dict[str, Any]], rows_per_batch: int,
                  enc: kpt_tasks.TaskEncoder, prefix: list[int], task: str,
                  max_len: int) -> tuple[list[dict[str, Any]], jax.Array, jax.Array]:
  """The questions of ``batch`` padded to ``rows_per_batch`` (the last one repeated):
  (rows, tokens i32[rows_per_batch, max_len], mask bool[rows_per_batch, max_len])."""
  rows = list(batch) + [batch[-1]] * (rows_per_batch - len(batch))
  tokens = np.full((rows_per_batch, max_len), enc.pad_id, np.int32)
  mask = np.zeros((rows_per_batch, max_len), bool)
  for i, row in enumerate(rows):
    spec, k = row["spec"], row["keypoint"]
    ids = prefix + enc.task_query(task, spec.names[k], spec.descriptions[k], spec.subject)
    if len(ids) > max_len:
      raise ConfigError(f"data.max_len={max_len} is shorter than a question ({len(ids)})")
    tokens[i, :len(ids)], mask[i, :len(ids)] = ids, True
  return rows, jnp.asarray(tokens), jnp.asarray(mask)


def _prompt_embedder(model: Any) -> Any:
  """(params, rows) -> the supports' keypoint prompt embeddings (KptLLM
  ``embed_prompts``, jitted; traced at the first call)."""
  embed = jax.jit(lambda p, i, x, m: model.apply({"params": p}, i, x, m,
                                                 method="embed_prompts"))
  return lambda params, rows: embed(params, _stack(rows, "support_image"),
                                    _stack(rows, "support_xy")[:, :, None],
                                    _stack(rows, "support_mask")[:, :, None])


def evaluate_cape(config: Any, model: Any, params: Any, tokenizer: Any,
                  records: Sequence[Any], *, task: str = "visual", shots: int = 1,
                  seed: int = 0, rows_per_batch: int = 16, threshold: float = 0.2,
                  max_new_tokens: Optional[int] = None,
                  coco_gt: Optional[str] = None) -> dict[str, Any]:
  """PCK@threshold per category and mean (module docstring).

  Args:
    config: the full config (model.kpt, data: template, coord_format, padding,
      normalization, max_len).
    model, params: ``KptLLM`` (or a ``VLM`` for the textual task) and its params;
      tokenizer: the model's tokenizer.
    records: the test instances (e.g. ``read_mp100`` of ``mp100_split{k}_test.json``).
    task: 'visual' or 'textual'.
    shots: supports per query (visual).
    seed: the support draw.
    rows_per_batch: questions decoded together (the last batch is padded).
    max_new_tokens: default ``config.decode.max_new_tokens``.
    coco_gt: the records' COCO file, for OKS AP too (AP-10K: one keypoint spec with OKS
      sigmas; only the records' images are evaluated, so a family split scores alone).

  Returns:
    ``metrics.category_pck``'s dict plus 'questions' (keypoints asked), the missing
    counts (module docstring), and with ``coco_gt`` the COCO AP/AR names
    (``metrics.COCO_AP_NAMES``).
  """
  if task not in ("visual", "textual"):
    raise ConfigError(f"evaluate_cape: task {task!r} (expected 'visual' or 'textual')")
  if task == "visual" and model is not None and not hasattr(model, "embed_prompts"):
    raise ConfigError("evaluate_cape: visual prompts need a KptLLM model (model.kpt.enabled)")
  regress = config.data.coord_format == "keypoint_token"
  if config.data.coord_format not in ("keypoint_token", "decimal2d"):
    raise ConfigError(f"evaluate_cape: coord_format {config.data.coord_format!r} (expected "
                      "'keypoint_token' or 'decimal2d')")
  enc = _task_encoder(config, tokenizer)
  prefix = enc.prefix()
  max_len = int(config.data.max_len) or 512
  new = int(max_new_tokens or config.decode.max_new_tokens)
  side = int(config.model.vit.image_size)
  k_max = max(r.num_keypoints for r in records)
  pred = np.zeros((len(records), k_max, 2))
  visible = np.zeros((len(records), k_max), bool)    # asked
  missing = np.zeros((len(records), k_max), bool)    # asked, no answer
  unreadable: dict[int, str] = {}                    # query index -> unreadable image
  embed_prompts = _prompt_embedder(model)
  batch: list[dict[str, Any]] = []

  def flush():
    n = len(batch)
    rows, tokens, mask = _encode_batch(batch, rows_per_batch, enc, prefix, task, max_len)
    prompt = embed_prompts(params, rows) if task == "visual" else None
    xy, generated = kpt_decode.generate_keypoints(
        model, params, _stack(rows, "image"), tokens, mask, prompt_embeds=prompt,
        max_new_tokens=new, eos_id=enc.eos_id, force_keypoint=regress)
    answers = list(np.asarray(xy)[:n]) if regress else \
        [_parse(tokenizer, g, enc.eos_id) for g in np.asarray(generated)[:n]]
    for row, p in zip(batch, answers):
      visible[row["index"], row["keypoint"]] = True
      if p is None or not np.isfinite(p).all():
        missing[row["index"], row["keypoint"]] = True
        continue
      image_xy = transforms.apply_affine(np.asarray(p)[None] * side, row["affine_inv"])[0]
      pred[row["index"], row["keypoint"]] = image_xy
    batch.clear()

  for question in _questions(config, records, task, shots, seed):
    if "image_error" in question:
      visible[question["index"], question["keypoint"]] = True
      missing[question["index"], question["keypoint"]] = True
      unreadable[question["index"]] = question["image_error"]
      continue
    batch.append(question)
    if len(batch) == rows_per_batch:
      flush()
  if batch:
    flush()
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
  result.update(evaluate.missing_counts(missing, visible, broken, list(unreadable.values())))
  if coco_gt:
    result.update(_coco_ap(coco_gt, records, pred, missing | ~visible))
  return result


def _coco_ap(coco_gt: str, records: Sequence[Any], pred: np.ndarray,
             missing: np.ndarray) -> dict[str, float]:
  """OKS AP of the predictions, one result per instance (score 1) on its own image, in
  the instance's own category; ``missing`` bool[N, K] keypoints not asked or not
  answered. The images are those of the records' categories
  (``metrics.coco_keypoint_ap``), so a family split scores alone."""
  specs = pipeline._specs_for(records)   # pylint: disable=protected-access
  names = {records[0].spec} | {r.spec for r in records}
  if len(names) != 1 or specs[records[0].spec].sigmas is None:
    raise ConfigError(f"OKS AP needs one keypoint spec with sigmas; got {sorted(names)}")
  spec = specs[records[0].spec]
  category = evaluate.category_ids(coco_gt, records)
  k = spec.num_keypoints
  results = [metrics.coco_result(r.image_id, np.concatenate([pred[i, :k], np.ones((k, 1))], 1),
                                 1.0, category[int(r.ann_id)], missing=missing[i, :k])
             for i, r in enumerate(records)]
  return metrics.coco_keypoint_ap(coco_gt, results, spec.sigmas,
                                  category_ids=sorted(set(category.values())),
                                  protocol=metrics.ap_protocol(records[0].dataset))


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
    raise ConfigError("evaluate_semantic needs a KptLLM model (model.kpt.enabled)")
  enc = _task_encoder(config, tokenizer)
  prefix, max_len = enc.prefix(), int(config.data.max_len) or 512
  new = int(max_new_tokens or config.decode.max_new_tokens)
  embed_prompts = _prompt_embedder(model)
  hits: dict[str, list[bool]] = {}
  unreadable: dict[int, str] = {}
  batch: list[dict[str, Any]] = []

  def flush():
    n = len(batch)
    rows, tokens, mask = _encode_batch(batch, rows_per_batch, enc, prefix, "semantic",
                                       max_len)
    _, generated = kpt_decode.generate_keypoints(
        model, params, _stack(rows, "image"), tokens, mask,
        prompt_embeds=embed_prompts(params, rows), max_new_tokens=new, eos_id=enc.eos_id,
        force_keypoint=False)
    for row, g in zip(batch, np.asarray(generated)[:n]):
      text = _answer_text(tokenizer, g, enc.eos_id)
      truth = row["spec"].descriptions[row["keypoint"]]
      hits.setdefault(row["spec"].subject, []).append(_normalize(text) == _normalize(truth))
    batch.clear()

  missing = 0
  for question in _questions(config, records, "semantic", 1, 0):
    if "image_error" in question:            # unreadable image: a wrong answer
      hits.setdefault(question["spec"].subject, []).append(False)
      unreadable.setdefault(question["index"], question["image_error"])
      missing += 1
      continue
    batch.append(question)
    if len(batch) == rows_per_batch:
      flush()
  if batch:
    flush()
  flat = [h for v in hits.values() for h in v]
  return {"accuracy": float(np.mean(flat)) if flat else float("nan"),
          "per_category": {c: float(np.mean(v)) for c, v in sorted(hits.items())},
          "questions": len(flat), "num_answers": len(flat) - missing, "parse_failures": 0,
          "parse_failure_rate": 0.0, "missing_keypoints": missing,
          "image_errors": len(unreadable), "unreadable_images": sorted(set(unreadable.values()))}


def load_kpt_model(config: Any, checkpoint: str = "", step: Optional[int] = None
                   ) -> tuple[Any, Any, Any]:
  """(config, model, params): ``KptLLM`` when ``model.kpt.enabled``, else the ``VLM``
  of ``kptjax.evaluate.load_model``. From a training workdir (its ``model_config.json``
  and its checkpoint at ``step``, default the latest), else the Hugging Face dirs (prompt
  modules and head fresh), else random weights."""
  from kptjax.training import preflight  # pylint: disable=g-import-not-at-top
  from kptjax.models import kptllm  # pylint: disable=g-import-not-at-top
  if factory.variant(config) != "kptllm":
    return evaluate.load_model(config, checkpoint, step)
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  if checkpoint:
    from kptjax.training import checkpoint as ckpt_lib
    if not os.path.exists(checkpoint):
      raise errors.CheckpointError(f"{checkpoint}: no such checkpoint directory")
    model_file = evaluate._model_config_file(checkpoint)  # pylint: disable=protected-access
    if model_file:
      with open(model_file, encoding="utf-8") as f:
        config = preflight.with_model_config(config, ml_collections.ConfigDict(json.load(f)))
    abstract = nn.meta.unbox(kptllm.abstract_params(config.model))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params, missing = ckpt_lib.load_params(checkpoint, abstract,
                                           jax.tree.map(lambda _: device, abstract), step=step)
    if missing:
      raise errors.CheckpointError(f"{checkpoint}: {len(missing)} params are not in the "
                                   f"checkpoint: {missing[:5]}")
    return config, kptllm.KptLLM(config.model), params
  params = kptllm.init_params(config.model, jax.random.key(config.seed))
  if config.checkpoints.llm_dir or config.checkpoints.vit_dir:
    from kptjax import convert  # pylint: disable=g-import-not-at-top
    model_config, loaded = convert.load_vlm(config)
    config = preflight.with_model_config(config, model_config)
    params = {**kptllm.init_params(config.model, jax.random.key(config.seed)), **loaded}
  else:
    logging.warning("No --checkpoint and no config.checkpoints dirs: random weights.")
  return config, kptllm.KptLLM(config.model), params


def run(config: Any, out_dir: str, *, checkpoint: str = "", task: str = "visual",
        shots: int = 1, seed: int = 0, rows_per_batch: int = 16) -> dict[str, Any]:
  """Evaluates ``config.data.eval`` at the checkpoint's latest step and writes
  ``out_dir/metrics.json`` (read back when its provenance is this run's: finished work
  is not redone; otherwise recomputed, logged)."""
  step = evaluate.checkpoint_step(checkpoint)
  records = pipeline.load_records(config, "eval")
  record = evaluate.eval_provenance(
      evaluate.resolve_config(config, checkpoint), records, checkpoint=checkpoint, step=step,
      evaluation={"task": task, "shots": shots, "seed": seed, "rows_per_batch": rows_per_batch})
  saved = evaluate.saved_result(out_dir, record, files=(evaluate.METRICS,))
  if saved is not None:
    return saved
  config, model, params = load_kpt_model(config, checkpoint, step)
  tokenizer = evaluate.load_tokenizer(config)
  if task == "semantic":
    result = evaluate_semantic(config, model, params, tokenizer, records,
                               rows_per_batch=rows_per_batch)
  else:
    source = str(getattr(records, "source", ""))
    ap_gt = source if records and records[0].dataset == "ap10k" else None
    result = evaluate_cape(config, model, params, tokenizer, records, task=task, shots=shots,
                           seed=seed, rows_per_batch=rows_per_batch, coco_gt=ap_gt)
  result.update(task=task, shots=shots, seed=seed, checkpoint=checkpoint,
                checkpoint_step=step, dataset=dict(config.data.eval), provenance=record)
  storage.write_json_atomic(os.path.join(out_dir, evaluate.METRICS), result)
  return result


def _define_flags() -> None:
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
  flags.DEFINE_string("checkpoint", "", "Training workdir (or its checkpoints dir).")
  flags.DEFINE_enum("task", "visual", ["visual", "textual", "semantic"], "Which task.")
  flags.DEFINE_integer("shots", 1, "Supports per query (visual).")
  flags.DEFINE_integer("seed", 0, "Support draw.")
  flags.DEFINE_string("out", None, "Output directory (metrics.json).")


def main(argv):
  del argv
  f = flags.FLAGS
  result = run(f.config, f.out, checkpoint=f.checkpoint, task=f.task, shots=f.shots,
               seed=f.seed)
  key = "accuracy" if f.task == "semantic" else "PCK@0.2"
  logging.info("%s: %s = %.4f over %d questions", f.task, key, result[key],
               result["questions"])


if __name__ == "__main__":
  _define_flags()
  app.run(main)
