"""Grain input pipelines: train (shuffled, repeated, augmented, batched) and eval (ordered, exact).

Train::

    records -> [process_index::process_count] -> shuffle(seed) -> repeat -> random_map(
      load image, crop_person (augmented), conversation) -> to_iter_dataset -> batch(B)
      [-> mp_prefetch(num_workers)]

With ``data.curriculum`` (e.g. ``'64:500'``) the stream starts with stages drawn from
the first N items only (``CurriculumItems``), not augmented unless
``data.curriculum_augment``: a model trained from scratch first learns to read a few
images, then all of them (the CPU demo).

Every element's randomness (augmentation, round order) comes from grain's
``random_map`` generator, seeded by ``config.seed`` and the element's index in the
repeated stream, so batches are deterministic, each epoch differs, and an iterator
restored with ``set_state(get_state())`` yields the same next batch. Batches are numpy
dicts with static shapes (B = train.batch_size // process_count, T = data.max_len):
``image`` f32[B, H, W, 3] (normalized), ``tokens``/``targets`` i32[B, T], ``loss_mask``
f32[B, T], ``input_mask`` bool[B, T], ``skipped_images`` i32[B].

Unreadable images: an element whose image (or a support image) is missing or cannot be
decoded (``transforms.load_image`` raises ``ImageError``) is skipped and logged with the
file's name; ``skipped_images[b]`` counts the elements skipped just before row b, so
the batches' sum is the number skipped (``kptjax.train`` logs the running total as
``skipped_images``). The skip keeps the stream deterministic and resumable (the element
indices do not move). ``data.strict_images=True`` (``python -m kptjax.train --strict``)
raises the ImageError instead; a whole epoch of unreadable images in a row is an
ImageError either way.

A person whose keypoints all leave the augmented crop gets no rounds (its loss mask is
all zero); readers already skip persons without labeled keypoints.

Eval: one element per person, in record order, no augmentation: ``image`` f32[H, W, 3],
``affine_inv`` f32[2, 3] (crop px -> image px), ``keypoints`` f32[K, 3] (ground truth,
image px, x y v; K = the largest spec among the records, rows past ``num_keypoints`` i32
are zero: MP-100 mixes categories), ``box`` f32[4], ``score`` f32, ``image_id`` i64,
``ann_id`` i64, ``index`` i32 (into the records list, for any other metadata), ``valid``
bool. With ``batch_size`` the tail is padded (copies
of a real person with ``valid=False``) so every process runs the same number of batches.

Data sources (``config.data.train`` / ``config.data.eval``): ``source='synthetic'``
generates (once, cached) ``num_images`` images of ``preset`` with ``seed`` and ``knobs``
under ``path`` (default ``$KPTJAX_DATA_DIR/synthetic`` or ``~/.cache/kptjax/synthetic``);
``source='synthetic_objects'`` the non-human categories of ``synthetic_objects`` there;
any other source is read by ``kptjax.data.sources.read_dataset(source, ann_file,
image_root, det_file=..., **options)``, where ``ann_file``/``image_root`` default to the
COCO layout under ``path`` (``annotations/person_keypoints_{split}.json``, ``{split}/``;
MP-100: ``annotations/{split}.json``, ``images/``).

Worker processes (``data.num_workers > 0``) use grain's ``mp_prefetch``; they need absl
flags parsed, so run under ``absl.app.run`` (the train and bench entry points do).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import os
from typing import Any, Callable, Optional, Sequence

from absl import logging
import grain
import numpy as np

from kptjax.data import conversation
from kptjax.data import synthetic
from kptjax.data import synthetic_objects
from kptjax.data import transforms
from kptjax.data.sources import Records, eval_options, read_dataset
from kptjax.errors import ConfigError, DataError, ImageError
from kptjax.keypoints import get_spec


def parse_options(text: str) -> dict[str, Any]:
  """'headbox_file=/x.mat,min_keypoints=0' -> {'headbox_file': '/x.mat', 'min_keypoints': 0}."""
  out = {}
  for part in (text or "").split(","):
    if not part.strip():
      continue
    if "=" not in part:
      raise ConfigError(f"data options entry {part!r} is not key=value")
    key, value = (s.strip() for s in part.split("=", 1))
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


# Default file layout under data.{train,eval}.path: (annotation file, image root).
_LAYOUTS = {
    "coco": ("annotations/person_keypoints_{split}.json", "{split}"),
    "mp100": ("annotations/{split}.json", "images"),
}


def load_records(config: Any, split: str) -> Records:
  """Person records of ``config.data.train`` (split='train') or ``config.data.eval``."""
  if split not in ("train", "eval"):
    raise ConfigError(f"split must be 'train' or 'eval', got {split!r}")
  d = config.data.train if split == "train" else config.data.eval
  source = d.source
  det = {}
  if d.get("det_file"):
    det = dict(det_file=d.det_file, det_score_threshold=d.get("det_score_threshold", 0.0))
  if source == "synthetic":
    ann_file, image_root = synthetic.ensure_dataset(
        d.path or synthetic.default_root(), d.preset, d.split, int(d.num_images),
        int(d.get("seed", 0)), overrides=d.get("knobs", "") or None, progress=True)
    return read_dataset("synthetic", ann_file, image_root, **det)
  if source == "synthetic_objects":      # non-human categories, MP-100 style (one spec each)
    ann_file, image_root = synthetic_objects.generate_objects(
        os.path.join(d.path or synthetic.default_root(), f"objects-seed{int(d.get('seed', 0))}"),
        num_images=int(d.num_images), seed=int(d.get("seed", 0)), split=d.split)
    return read_dataset("mp100", ann_file, image_root, **det)
  ann_file, image_root = d.get("ann_file", ""), d.get("image_root", "")
  if not ann_file:
    if not d.get("path"):
      raise ConfigError(f"data.{split}: give ann_file (+ image_root) or path for source "
                        f"{source!r}")
    layout = _LAYOUTS.get(source, _LAYOUTS["coco"])
    ann_file = os.path.join(d.path, layout[0].format(split=d.split))
    image_root = image_root or os.path.join(d.path, layout[1].format(split=d.split))
  options = {**det, **parse_options(d.get("options", ""))}
  if split == "eval":
    options = eval_options(source, options)
  return read_dataset(source, ann_file, image_root, **options)


def _specs_for(records: Sequence[Any]) -> dict[str, Any]:
  specs = dict(getattr(records, "specs", {}) or {})
  for name in {r.spec for r in records}:
    if name not in specs:
      specs[name] = get_spec(name)
  return specs


def augment_config(config: Any) -> transforms.AugmentConfig:
  """config.data.augment (its ``rotation`` is the maximum angle) as an AugmentConfig."""
  a = config.data.augment
  return transforms.AugmentConfig(
      scale_sigma=float(a.scale_sigma), scale_min=float(a.scale_min),
      scale_max=float(a.scale_max), rotation_max=float(a.rotation),
      rotation_prob=float(a.rotation_prob), flip_prob=float(a.flip_prob))


def _crop_side(config: Any) -> int:
  return int(config.model.vit.image_size)


def _with_depth(crop: dict[str, Any], spec: Any, record: Any) -> np.ndarray:
  """f32[K, 4] (x, y crop px, z - z_root mm, v) for decimal3d answers."""
  k3 = crop.get("keypoints_3d")
  if k3 is None:
    raise DataError(record.image_path, "coord_format 'decimal3d' needs 3D keypoints",
                    field="keypoints_3d", record=record.ann_id)
  root = spec.root_index if spec.root_index is not None else 0
  kp = crop["keypoints"]
  out = np.zeros((kp.shape[0], 4), np.float32)
  out[:, :2] = kp[:, :2]
  out[:, 2] = k3[:, 2] - k3[root, 2]
  out[:, 3] = np.where(k3[:, 3] > 0, kp[:, 2], 0.0)
  return out


class TrainTransform:
  """(record index, keypoint group) + rng -> one training example (picklable for workers)."""

  def __init__(self, config: Any, tokenizer: Any, records: Sequence[Any]):
    self.records = list(records)
    self.specs = _specs_for(records)
    self.side = _crop_side(config)
    self.padding = float(config.data.padding)
    self.normalization = config.data.normalization
    self.augment = augment_config(config)
    self.coord_format = config.data.coord_format
    self.encoder = conversation.ConversationEncoder(
        tokenizer, config.data, conversation.num_image_tokens(config.model),
        image_token_id=config.model.get("image_token_id", None))

  def __call__(self, item: tuple[int, Optional[tuple[int, ...]]],
               rng: np.random.Generator) -> dict[str, np.ndarray]:
    index, group = item
    record = self.records[index]
    spec = self.specs[record.spec]
    image = transforms.load_record_image(record)
    crop = transforms.crop_person(record, image, (self.side, self.side), padding=self.padding,
                                  rng=rng, augment_cfg=self.augment, spec=spec)
    kp = _with_depth(crop, spec, record) if self.coord_format == "decimal3d" \
        else crop["keypoints"]
    ex = self.encoder.encode(kp, self.side, spec, rng, keypoint_ids=group)
    return dict(image=transforms.normalize_image(crop["image"], self.normalization)
                .astype(np.float32),
                tokens=ex["tokens"], targets=ex["targets"], loss_mask=ex["loss_mask"],
                input_mask=ex["input_mask"])


def _items(records: Sequence[Any], group_size: int, seed: int
           ) -> list[tuple[int, Optional[tuple[int, ...]]]]:
  """Dataset elements: one per person, or CapeLLM's fixed groups of keypoints per person.

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


def parse_curriculum(text: str) -> tuple[tuple[int, int], ...]:
  """``'64:500,512:300'`` -> ((64, 500), (512, 300)): (first N items, steps) stages."""
  stages = []
  for part in (text or "").split(","):
    if not part.strip():
      continue
    try:
      n, steps = (int(v) for v in part.split(":"))
    except ValueError:
      raise ConfigError(f"data.curriculum: {part!r} is not 'items:steps'") from None
    if n < 1 or steps < 1:
      raise ConfigError(f"data.curriculum: {part!r} needs items >= 1 and steps >= 1")
    stages.append((n, steps))
  return tuple(stages)


@dataclasses.dataclass(frozen=True)
class CurriculumItems:
  """The repeated, shuffled item stream with a small-set warm start (random access).

  Element i of stage k (``stages[k] = (n, steps)``, ``steps * batch`` elements) is
  ``(item, True)`` for one of the first ``n`` items, each epoch of them in a fresh
  permutation; after the stages, ``(item, False)`` for every item, epoch by epoch.
  Deterministic in ``seed`` and i, so a restored iterator continues exactly.
  """
  items: tuple
  stages: tuple[tuple[int, int], ...]
  batch: int
  seed: int

  def __len__(self) -> int:
    return 2**62

  def __getitem__(self, i: int) -> Any:
    start = 0
    for k, (n, steps) in enumerate(self.stages):
      size = steps * self.batch
      if i < start + size:
        return self._pick(k, min(n, len(self.items)), i - start), True
      start += size
    return self._pick(len(self.stages), len(self.items), i - start), False

  def _pick(self, stage: int, n: int, j: int) -> Any:
    epoch, pos = divmod(j, n)
    order = _permutation(self.seed, stage, epoch, n)
    return self.items[int(order[pos])]


@functools.lru_cache(maxsize=8)
def _permutation(seed: int, stage: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, stage, epoch]).permutation(n)


NO_AUGMENT = transforms.AugmentConfig(scale_sigma=0.0, scale_min=1.0, scale_max=1.0,
                                      rotation_max=0.0, rotation_prob=0.0, flip_prob=0.0)


class CurriculumTransform:
  """``(item, in_stage)`` -> ``transform(item)``; without augmentation in the curriculum
  stages unless ``augment_stages`` (the transform's ``augment`` field is swapped)."""

  def __init__(self, transform: Any, augment_stages: bool):
    self.transform = transform
    self.plain = transform
    if not augment_stages:
      self.plain = copy.copy(transform)
      self.plain.augment = NO_AUGMENT

  def __call__(self, element: tuple[Any, bool], rng: np.random.Generator) -> Any:
    item, in_stage = element
    return (self.plain if in_stage else self.transform)(item, rng)


SKIPPED_IMAGES = "skipped_images"   # the batch field counting skipped elements


@dataclasses.dataclass(frozen=True)
class SkippedImage:
  """Stands in for a training element whose image could not be read (``SkipUnreadable``).

  Attributes:
    path: the image file.
    reason: the ImageError's message.
  """
  path: str
  reason: str


class SkipUnreadable:
  """A training transform whose ``ImageError`` becomes a logged ``SkippedImage``, or is
  raised when ``strict`` (``data.strict_images``). Picklable for grain workers."""

  def __init__(self, transform: Callable[..., Any], strict: bool):
    self.transform = transform
    self.strict = strict

  def __call__(self, *args: Any) -> Any:
    try:
      return self.transform(*args)
    except ImageError as e:
      if self.strict:
        raise
      logging.warning("Skipping a training example (data.strict_images=False): %s", e)
      return SkippedImage(str(e.path), str(e))


class CountSkipped(grain.IterDataset):
  """Drops ``SkippedImage`` elements of ``parent``; every kept element (a dict) gets
  ``skipped_images`` i32: how many were dropped just before it. ``limit`` dropped in a
  row (nothing readable left) is an ImageError."""

  def __init__(self, parent: grain.IterDataset, limit: int):
    super().__init__(parent)
    self.limit = max(int(limit), 1)

  def __iter__(self) -> grain.DatasetIterator:
    return _CountSkippedIterator(self._parent.__iter__(), self.limit)


class _CountSkippedIterator(grain.DatasetIterator):
  """``CountSkipped``'s iterator; its state is the parent's (it holds nothing between
  elements, so a restored stream continues exactly)."""

  def __init__(self, parent: grain.DatasetIterator, limit: int):
    super().__init__(parent)
    self.limit = limit

  def __next__(self) -> dict[str, Any]:
    skipped = 0
    while True:
      element = next(self._parent)
      if not isinstance(element, SkippedImage):
        return {**element, SKIPPED_IMAGES: np.int32(skipped)}
      skipped += 1
      if skipped >= self.limit:
        raise ImageError(element.path, f"{skipped} training examples in a row have no "
                         f"readable image; the last: {element.reason}", field="image")

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)


def skip_unreadable(ds: grain.MapDataset, transform: Callable[..., Any], config: Any, *,
                    limit: int, random: bool, read_options: Optional[grain.ReadOptions] = None
                    ) -> grain.IterDataset:
  """``ds`` mapped by ``transform`` (a grain ``random_map`` if ``random``, else ``map``),
  with unreadable images skipped and counted (module docstring), as an IterDataset."""
  guarded = SkipUnreadable(transform, bool(config.data.get("strict_images", False)))
  ds = ds.random_map(guarded, seed=int(config.seed)) if random else ds.map(guarded)
  return CountSkipped(ds.to_iter_dataset(read_options), limit)


def _read_options(config: Any, batch_size: int) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=int(config.data.get("read_threads", 2)),
                           prefetch_buffer_size=max(2 * batch_size, 8))


def make_train_dataset(config: Any, tokenizer: Any, *, records: Optional[Sequence[Any]] = None,
                       process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """The training stream of batches for this process (module docstring).

  Args:
    config: the full config (data, model.vit, model.image_token_id, train.batch_size, seed).
    tokenizer: the tokenizer the model uses.
    records: person records (default ``load_records(config, 'train')``).
    process_index, process_count: this process's slice of the records.
  """
  return _train_stream(config, records, lambda r: TrainTransform(config, tokenizer, r),
                       process_index, process_count, "train pipeline")


def _train_stream(config: Any, records: Optional[Sequence[Any]],
                  make_transform: Callable[[Sequence[Any]], Any], process_index: int,
                  process_count: int, name: str) -> grain.IterDataset:
  """This process's training batches: its slice of the items of ``records`` (default
  ``load_records(config, 'train')``), shuffled, repeated, each made an example by
  ``make_transform(records)`` (a grain random map), batched (``make_train_dataset`` and
  ``kpt_pipeline.make_kpt_train_dataset``; ``name`` begins the log line)."""
  if records is None:
    records = load_records(config, "train")
  if not records:
    raise ConfigError("no training records")
  if config.train.batch_size % process_count:
    raise ConfigError(f"train.batch_size={config.train.batch_size} is not divisible by "
                      f"{process_count} processes")
  batch = config.train.batch_size // process_count
  items = _items(records, int(config.data.get("group_size", 0)), int(config.seed))
  items = items[process_index::process_count]
  logging.info("%s: %d items for process %d/%d, batch %d", name, len(items),
               process_index, process_count, batch)
  transform = make_transform(records)
  stages = parse_curriculum(config.data.get("curriculum", ""))
  if stages:
    augment = bool(config.data.get("curriculum_augment", False))
    logging.info("%s: curriculum %s (first items: steps; augmented: %s), then all", name,
                 stages, augment)
    ds = grain.MapDataset.source(CurriculumItems(tuple(items), stages, batch, int(config.seed)))
    transform = CurriculumTransform(transform, augment)
  else:
    ds = grain.MapDataset.source(items).shuffle(seed=int(config.seed)).repeat()
  it = skip_unreadable(ds, transform, config, limit=len(items), random=True,
                       read_options=_read_options(config, batch))
  it = it.batch(batch, drop_remainder=True)
  workers = int(config.data.get("num_workers", 0))
  if workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                     per_worker_buffer_size=2))
  return it


class EvalTransform:
  """Record index -> one eval element (no augmentation)."""

  def __init__(self, config: Any, records: Sequence[Any]):
    self.records = list(records)
    self.specs = _specs_for(records)
    self.side = _crop_side(config)
    self.padding = float(config.data.padding)
    self.normalization = config.data.normalization
    self.max_keypoints = max(r.num_keypoints for r in self.records)

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    record = self.records[index]
    image = transforms.load_record_image(record)
    crop = transforms.crop_person(record, image, (self.side, self.side), padding=self.padding,
                                  spec=self.specs[record.spec])
    keypoints = np.zeros((self.max_keypoints, 3), np.float32)
    keypoints[:record.num_keypoints] = np.asarray(record.keypoints, np.float32)[:, [0, 1, -1]]
    return dict(
        image=transforms.normalize_image(crop["image"], self.normalization).astype(np.float32),
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
