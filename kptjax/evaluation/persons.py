"""The 'keypoints' task: every keypoint of the spec asked about every person (LocLLM /
PoseLLM): crops in record order from the eval pipeline, batches of a static size
decoded by ``decode.Localizer``, answers mapped back to per-person entries, finished
persons streamed to the partial file.

    >>> for batch in decode_persons(localizer, records, iter_crops(config, records, ids), 8):
    ...   entries += batch

A keypoint is a number or it is missing (``parsing.Localization.missing``): missing
keypoints are misses in PCK / PCKh, never match in OKS, and are counted (not averaged)
in MPJPE. A person whose image is missing or corrupt (``errors.ImageError``) is kept,
every keypoint missing, and counted (``image_errors``).

Person score = mean keypoint score (LocLLM; 0 for a missing keypoint) x the box score
(1 for ground-truth boxes).
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Optional, Sequence

import numpy as np
from absl import logging
from tqdm import tqdm

from kptjax import errors
from kptjax.data import pipeline
from kptjax.evaluation import loading, protocols, results
from kptjax.inference import decode, parsing


def iter_crops(config: Any, records: Sequence[Any], indices: Sequence[int]) -> Iterator[dict]:
  """Eval elements of ``records[i]`` for i in ``indices``, in order, made by the eval
  pipeline's transform (``kptjax.data.pipeline.EvalTransform``: same crop as training,
  no augmentation): {'index', 'image' f32[S, S, 3] normalized, 'affine_inv' f32[2, 3], ...}.
  A person whose image is missing or corrupt gives {'index', 'image_error': message}.
  Images are decoded by a few threads ahead of the decoder."""
  transform = pipeline.EvalTransform(config, records)

  def element(index: int) -> dict:
    try:
      return transform(index)
    except errors.ImageError as e:
      return {"index": np.int32(index), "image_error": str(e)}

  with ThreadPoolExecutor(max_workers=4) as pool:
    yield from pool.map(element, indices)


def _batches(items: Iterator[dict], size: int) -> Iterator[list[dict]]:
  batch = []
  for item in items:
    batch.append(item)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


def person_entry(rec: Any, index: int, loc: parsing.Localization, i: int) -> dict:
  """The partial-file entry of one decoded person: keypoints [K, 3] (x px, y px, score;
  0 where missing), ``missing`` keypoint indices, answer texts, score, and for 3D
  ``depth_rel`` [K] mm."""
  kps = np.concatenate([loc.keypoints[i], loc.scores[i][:, None]], axis=1)
  entry = {"index": int(index), "image_id": int(rec.image_id), "ann_id": int(rec.ann_id),
           "keypoints": kps.round(3).tolist(),
           "score": float(loc.person_scores[i]) * float(rec.score),
           "missing": np.flatnonzero(loc.missing[i]).tolist(), "texts": loc.texts[i]}
  if loc.depth is not None:
    entry["depth_rel"] = loc.depth[i].round(3).tolist()
  return entry


def unanswered_entry(rec: Any, index: int, k: int, is_3d: bool, error: str) -> dict:
  """The entry of a person that could not be decoded: every keypoint missing."""
  entry = {"index": int(index), "image_id": int(rec.image_id), "ann_id": int(rec.ann_id),
           "keypoints": np.zeros((k, 3)).tolist(), "score": 0.0, "missing": list(range(k)),
           "texts": [""] * k, "image_error": error}
  if is_3d:
    entry["depth_rel"] = [0.0] * k
  return entry


def decode_persons(localizer: Any, records: Sequence[Any], items: Iterator[dict],
                   batch_size: int) -> Iterator[list[dict]]:
  """Eval elements -> per-person prediction entries, one list per batch.

  Batches have a static size (the tail is padded with copies and the copies dropped),
  so the decoder compiles once. An element with an ``image_error`` is not decoded: its
  entry has every keypoint missing and the error (logged).
  """
  for batch in _batches(items, batch_size):
    good = [b for b in batch if "image_error" not in b]
    loc = None
    if good:
      pad = good + [good[0]] * (batch_size - len(good))
      loc = localizer(np.stack([b["image"] for b in pad]),
                      np.stack([b["affine_inv"] for b in pad]))
    row = {int(b["index"]): i for i, b in enumerate(good)}
    entries = []
    for item in batch:
      index = int(item["index"])
      if "image_error" in item:
        logging.warning("person %d: %s; all its keypoints are scored as missing", index,
                        item["image_error"])
        entries.append(unanswered_entry(records[index], index, len(localizer.names),
                                        localizer.count == 3, item["image_error"]))
      else:
        entries.append(person_entry(records[index], index, loc, row[index]))
    yield entries


def make_localizer(config: Any, model: Any, params: Any, tokenizer: Any,
                   spec: Any) -> decode.Localizer:
  """The Localizer asking every keypoint of ``spec`` (with descriptions when
  ``config.data.use_descriptions``)."""
  descriptions = spec.descriptions if config.data.use_descriptions else [None] * len(spec.names)
  return decode.Localizer(config, model, params, tokenizer, spec.names, descriptions,
                          subject=getattr(spec, "subject", "person"))


def decode_resumable(config: Any, localizer: Any, records: Sequence[Any],
                     indices: Sequence[int], out_dir: str, record: dict, *,
                     progress: bool = True, partial_name: str = results.PARTIAL
                     ) -> tuple[list[dict], dict[str, Any]]:
  """Entries of ``records[i]`` for i in ``indices``, decoded in batches of
  ``config.decode.batch_persons`` and appended to the partial file as they come;
  persons already in it (same provenance, without the 'evaluation' options) are not
  decoded again. ``partial_name``: the partial file in ``out_dir`` (one per process).

  Returns:
    (entries in ``indices`` order, timing {'wall_s', 'first_batch_s', 'persons_per_s'
    (after the first batch, which includes the compilation, when there are more)}).
  """
  partial_path = os.path.join(out_dir, partial_name)
  partial_record = {k: v for k, v in record.items() if k != "evaluation"}
  done = results.read_partial(partial_path, partial_record)
  todo = [i for i in indices if i not in done]
  batch_size = int(config.decode.batch_persons)
  t0, decoded, first = time.time(), 0, None
  with open(partial_path, "a" if done else "w") as partial, \
      tqdm(total=len(indices), initial=len(indices) - len(todo), disable=not progress,
           desc=f"evaluate {os.path.basename(out_dir.rstrip('/'))}", unit="person") as bar:
    if not done:
      partial.write(json.dumps({"provenance": partial_record}) + "\n")
    for batch in decode_persons(localizer, records, iter_crops(config, records, todo),
                                batch_size):
      for entry in batch:
        done[entry["index"]] = entry
        partial.write(json.dumps(entry) + "\n")
      partial.flush()
      decoded += len(batch)
      bar.update(len(batch))
      if first is None:                      # the first batch includes the compilation
        first = (decoded, time.time() - t0)
  wall = time.time() - t0
  if first and decoded > first[0]:
    speed = (decoded - first[0]) / max(wall - first[1], 1e-9)
  else:
    speed = decoded / wall if decoded and wall > 0 else None
  return [done[i] for i in indices], {"wall_s": wall, "first_batch_s": first[1] if first else None,
                                      "persons_per_s": speed}


def make_train_evaluator(config: Any, model: Any, mesh: Any = None):
  """The periodic-evaluation hook of ``kptjax.train``:
  ``config.train.evaluator = 'kptjax.evaluate:make_train_evaluator'``.

  Decodes the first ``config.decode.eval_persons`` persons of ``config.data.eval``
  (0 = all; crops made once) with the current params and returns scalars: PCK@0.05/0.1/
  0.2, COCO AP (when the protocol has OKS AP), and the parse-failure rate.
  """
  del mesh   # params arrive sharded; the decoder's jit follows their shardings
  tokenizer = loading.load_tokenizer(config)
  records = loading.load_eval_records(config)
  limit = int(config.decode.get("eval_persons", 0)) or len(records)
  indices = list(range(min(limit, len(records))))
  items = list(iter_crops(config, records, indices))
  spec = protocols.keypoint_spec(records, len(indices))
  protocol = protocols.protocol_for(records, config)
  coco_gt = protocols.oks_ground_truth(records, protocol)
  state: dict[str, Optional[decode.Localizer]] = {"localizer": None}

  def eval_fn(train_state: Any, step: int) -> dict[str, float]:
    del step
    if state["localizer"] is None:
      state["localizer"] = make_localizer(config, model, train_state.params, tokenizer, spec)
    localizer = state["localizer"]
    localizer.decoder.params = train_state.params
    entries = [e for batch in decode_persons(localizer, records, iter(items),
                                             int(config.decode.batch_persons)) for e in batch]
    result = protocols.compute_metrics(
        records, entries, spec.names, coco_gt=coco_gt, sigmas=spec.sigmas,
        has_gt=not config.data.eval.get("det_file"), protocol=protocol,
        mpii_box_pck=bool(config.decode.get("mpii_box_pck", False)))
    out = {"parse_failure_rate": result["parse_failure_rate"]}
    for k in ("PCK@0.05", "PCK@0.1", "PCK@0.2"):
      if k in result.get("pck", {}):
        out[k] = result["pck"][k]
    if "coco" in result:
      out["AP"] = result["coco"]["AP"]
    return out

  return eval_fn
