"""Grain input pipelines: train (shuffled, repeated, augmented, batched) and eval (ordered, exact).

Train (``make_train_dataset``, the one entry for every model and stage)::

    records -> items (persons, or CapeLLM's keypoint groups) -> [process_index::process_count]
      -> shuffle(seed) -> repeat [-> mix(weights) of the sources] -> random_map(element
      builder) -> skip unreadable -> batch(B) [-> mp_prefetch(num_workers)]

A mix of training sources (``config.data.train`` as named entries with weights,
``sources.catalog.train_entries``; LocLLM's Human3.6M + MPII): each source's items are
shuffled (seed + its position in the mix) and repeated on their own, then interleaved
by ``grain.MapDataset.mix`` in proportion to the weights; the records are concatenated
(``load_records(config, 'train')``), so item indices point into one list. The stream
stays a pure function of the element index (deterministic, resumable).

The element builder comes from ``kptjax.data.tasks.element_for``: caption records ->
stage-1 caption elements; person records -> the model variant's conversations
(``factory.variant``: LocLLM / PoseLLM / CapeLLM localization rounds, or KptLLM's task
conversations with supports). ``data.curriculum`` starts the stream with stages drawn
from the first items (``kptjax.data.curriculum``).

Every element's randomness (augmentation, round order, task, supports) comes from
grain's ``random_map`` generator, seeded by ``config.seed`` and the element's index in
the repeated stream, so batches are deterministic, each epoch differs, and an iterator
restored with ``set_state(get_state())`` yields the same next batch. Batches are numpy
dicts with static shapes (B = train.batch_size // process_count, T = data.max_len):
``image`` f32[B, H, W, 3] (normalized), ``tokens``/``targets`` i32[B, T], ``loss_mask``
f32[B, T], ``input_mask`` bool[B, T], ``skipped_images`` i32[B] (unreadable images
skipped before each row: ``kptjax.data.skipping``), plus the variant's fields (KptLLM:
``support_image`` f32[B, S, H, W, 3], ``support_xy`` f32[B, S, R, 2], ``support_mask``
f32[B, S, R], ``kpt_xy`` f32[B, R, 2], ``kpt_mask`` f32[B, R]; ``tasks.kptllm``).

A person whose keypoints all leave the augmented crop gets no rounds (its loss mask is
all zero); readers already skip persons without labeled keypoints.

Eval: one element per person, in record order, no augmentation: ``image`` f32[H, W, 3],
``affine_inv`` f32[2, 3] (crop px -> image px), ``keypoints`` f32[K, 3] (ground truth,
image px, x y v; K = the largest spec among the records, rows past ``num_keypoints`` i32
are zero: MP-100 mixes categories), ``box`` f32[4], ``score`` f32, ``image_id`` i64,
``ann_id`` i64, ``index`` i32 (into the records list, for any other metadata), ``valid``
bool. With ``batch_size`` the tail is padded (copies
of a real person with ``valid=False``) so every process runs the same number of batches.

Data sources (``config.data.train`` / ``config.data.eval``): the entry's ``source`` is
looked up in ``kptjax.data.sources.catalog.CATALOG`` (generated synthetic sets, file
layouts under ``path``) and read by ``kptjax.data.sources.read_dataset``.

Worker processes (``data.num_workers > 0``) use grain's ``mp_prefetch``; they need absl
flags parsed, so run under ``absl.app.run`` (the train and bench entry points do).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import grain
import numpy as np
from absl import logging

from kptjax.data import tasks
from kptjax.data.curriculum import CurriculumItems, CurriculumTransform, parse_curriculum
from kptjax.data.skipping import SKIPPED_IMAGES, skip_unreadable
from kptjax.data.sources import Records, eval_options, read_dataset, specs_of
from kptjax.data.sources.catalog import locate, train_entries
from kptjax.data.transforms import CropRecipe
from kptjax.errors import ConfigError

__all__ = ["SKIPPED_IMAGES", "CurriculumItems", "EvalTransform", "concat_records",
           "load_records", "load_train_parts", "make_eval_dataset", "make_train_dataset",
           "mixed_items", "parse_curriculum", "read_entry", "train_items"]

Item = tuple[int, Optional[tuple[int, ...]]]   # (record index, keypoint group or None)


def read_entry(entry: Any, where: str) -> Records:
  """The records of one data entry (``sources.catalog.locate``; an eval entry keeps
  persons whose image is missing, ``sources.eval_options``)."""
  reader, (ann_file, image_root), options = locate(entry, where)
  if where == "eval":
    options = eval_options(reader, options)
  return read_dataset(reader, ann_file, image_root, **options)


def load_train_parts(config: Any) -> list[tuple[str, Records, float]]:
  """(name, records, weight) of each source of ``config.data.train`` (one, or the mix)."""
  entries = train_entries(config.data.train)
  where = ["train"] if len(entries) == 1 else [f"train.{t.name}" for t in entries]
  return [(t.name, read_entry(t.entry, w), t.weight) for t, w in zip(entries, where)]


def concat_records(parts: Sequence[Records]) -> Records:
  """One Records of several (skip counts summed, specs merged, sources joined by '+')."""
  if len(parts) == 1:
    return parts[0]
  out = Records([r for p in parts for r in p],
                source="+".join(getattr(p, "source", "") for p in parts))
  for p in parts:
    out.skipped.update(getattr(p, "skipped", {}))
    out.specs.update(getattr(p, "specs", {}))
  return out


def load_records(config: Any, split: str) -> Records:
  """Person (or caption) records of ``config.data.train`` (split='train'; a mix of
  sources is concatenated in ``train_entries`` order) or ``config.data.eval``."""
  if split not in ("train", "eval"):
    raise ConfigError(f"split must be 'train' or 'eval', got {split!r}")
  if split == "eval":
    return read_entry(config.data.eval, "eval")
  return concat_records([records for _, records, _ in load_train_parts(config)])


def train_items(records: Sequence[Any], group_size: int, seed: int) -> list[Item]:
  """Dataset elements: one per record, or CapeLLM's fixed groups of keypoints per person.

  Groups: the person's K keypoints shuffled once (``seed``), cut into groups of
  ``group_size``; the last group is filled up with randomly chosen earlier keypoints.
  """
  if not group_size:
    return [(i, None) for i in range(len(records))]
  items = []
  for i, r in enumerate(records):
    rng = np.random.default_rng([seed, i])
    ids = [int(j) for j in rng.permutation(r.num_keypoints)]
    rest = len(ids) % group_size
    if rest and len(ids) > group_size:
      ids += [int(j) for j in rng.choice(ids[:-rest], group_size - rest, replace=False)]
    items += [(i, tuple(ids[s:s + group_size])) for s in range(0, len(ids), group_size)]
  return items


def mixed_items(part_items: Sequence[Sequence[Item]], weights: Sequence[float],
                seed: int) -> grain.MapDataset:
  """The endless item stream of several sources: source k's items shuffled with seed
  ``seed + k`` and repeated, interleaved by ``grain.MapDataset.mix`` in proportion to
  ``weights`` (element i is a pure function of i: deterministic and resumable)."""
  return grain.MapDataset.mix(
      [grain.MapDataset.source(list(p)).shuffle(seed=seed + k).repeat()
       for k, p in enumerate(part_items)], list(weights))


def make_train_dataset(config: Any, tokenizer: Any, *, records: Optional[Sequence[Any]] = None,
                       process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """This process's training batches (module docstring), for every model and stage.

  Args:
    config: the full config (data, model, train.batch_size, seed).
    tokenizer: the tokenizer the model uses.
    records: person or caption records (default: every source of ``config.data.train``,
      mixed by their weights); given records are one source.
    process_index, process_count: this process's slice of the items.
  """
  parts = [("train", records, 1.0)] if records is not None else load_train_parts(config)
  empty = [name for name, p, _ in parts if not p]
  if empty:
    raise ConfigError("no training records" + (f" in data.train.{empty}" if len(parts) > 1
                                                else ""))
  records = concat_records([p for _, p, _ in parts])
  if config.train.batch_size % process_count:
    raise ConfigError(f"train.batch_size={config.train.batch_size} is not divisible by "
                      f"{process_count} processes")
  batch = config.train.batch_size // process_count
  element = tasks.element_for(config, tokenizer, records)
  seed = int(config.seed)
  group_size = int(config.data.get("group_size", 0))
  part_items, start = [], 0
  for _, part, _ in parts:
    items = [(start + i, group) for i, group in train_items(part, group_size, seed)]
    part_items.append(items[process_index::process_count])
    start += len(part)
  items = [item for p in part_items for item in p]
  logging.info("%s: %d items for process %d/%d, batch %d", element.name, len(items),
               process_index, process_count, batch)
  stages = parse_curriculum(config.data.get("curriculum", ""))
  if stages and len(parts) > 1:
    raise ConfigError("data.curriculum draws from one item list: it does not combine with "
                      "a mix of training sources (data.train with weights)")
  if len(parts) > 1:
    if not all(part_items):
      raise ConfigError(f"data.train: a source has fewer items than the {process_count} "
                        f"processes (items {[len(p) for p in part_items]}, process "
                        f"{process_index})")
    logging.info("%s: mixing %d sources, items %s, weights %s", element.name, len(parts),
                 [len(p) for p in part_items], [w for _, _, w in parts])
    ds = mixed_items(part_items, [w for _, _, w in parts], seed)
  elif stages:
    augment = bool(config.data.get("curriculum_augment", False))
    logging.info("%s: curriculum %s (first items: steps; augmented: %s), then all",
                 element.name, stages, augment)
    ds = grain.MapDataset.source(CurriculumItems(tuple(items), stages, batch, seed))
    element = CurriculumTransform(element, augment)
  else:
    ds = grain.MapDataset.source(items).shuffle(seed=seed).repeat()
  read_options = grain.ReadOptions(num_threads=int(config.data.get("read_threads", 2)),
                                   prefetch_buffer_size=max(2 * batch, 8))
  it = skip_unreadable(ds, element, config, limit=len(items), read_options=read_options)
  it = it.batch(batch, drop_remainder=True)
  workers = int(config.data.get("num_workers", 0))
  if workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                     per_worker_buffer_size=2))
  return it


class EvalTransform:
  """Record index -> one eval element (module docstring; no augmentation)."""

  def __init__(self, config: Any, records: Sequence[Any]):
    self.records = list(records)
    self.specs = specs_of(records)
    self.crop = CropRecipe.from_config(config)
    self.max_keypoints = max(r.num_keypoints for r in self.records)

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    record = self.records[index]
    crop = self.crop(record, self.specs[record.spec])
    keypoints = np.zeros((self.max_keypoints, 3), np.float32)
    keypoints[:record.num_keypoints] = np.asarray(record.keypoints, np.float32)[:, [0, 1, -1]]
    return dict(
        image=crop["image"],
        affine_inv=np.asarray(crop["affine_inv"], np.float32),
        keypoints=keypoints,
        num_keypoints=np.int32(record.num_keypoints),
        box=np.asarray(record.box, np.float32),
        score=np.float32(record.score),
        image_id=np.int64(record.image_id),
        ann_id=np.int64(record.ann_id),
        index=np.int32(index),
        valid=np.bool_(True))


@dataclasses.dataclass(frozen=True)
class _PadTo:
  """Element i of ``parent`` for i < n, else a copy of element 0 marked ``valid=False``."""
  parent: Any
  n: int

  def __call__(self, i: int) -> dict[str, np.ndarray]:
    if i < self.n:
      return self.parent[i]
    out = dict(self.parent[0])
    out["valid"] = np.bool_(False)
    return out


def make_eval_dataset(config: Any, *, records: Optional[Sequence[Any]] = None,
                      process_index: int = 0, process_count: int = 1,
                      batch_size: Optional[int] = None) -> grain.MapDataset:
  """Ordered eval persons of this process (every person in exactly one process, once).

  Args:
    config: the full config.
    records: person records (default ``load_records(config, 'eval')``).
    process_index, process_count: this process's slice.
    batch_size: if given, batches of this static size; the tail (and every process up
      to the largest slice) is padded with ``valid=False`` rows.
  """
  if records is None:
    records = load_records(config, "eval")
  if not records:
    raise ConfigError("no eval records")
  indices = list(range(len(records)))[process_index::process_count]
  n_real = len(indices)
  # More processes than persons: this process only pads (with record 0, valid=False).
  ds = grain.MapDataset.source(indices or [0]).map(EvalTransform(config, records))
  if batch_size is None:
    return ds if n_real else ds[:0]
  per_process = -(-len(records) // process_count)
  total = -(-per_process // batch_size) * batch_size
  return grain.MapDataset.source(list(range(total))).map(_PadTo(ds, n_real)).batch(batch_size)

