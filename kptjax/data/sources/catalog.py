"""Where a config's data entry finds its files: one table entry per source, no if-chains.

A data entry (``config.data.train`` / ``config.data.eval``) names a ``source``. Its
``CATALOG`` entry says which reader of ``read_dataset`` parses the files and where the
files are: either a default layout under ``path`` (``ann_file`` / ``image_root`` given
in the entry win), or a generator that makes them (the synthetic sets, cached):

  source             reader      files
  synthetic          synthetic   ``synthetic.ensure_dataset(path, preset, split,
                                 num_images, seed, knobs)``
  synthetic_objects  mp100       ``synthetic_objects.generate_objects(path/objects-seed{seed})``
  mp100              mp100       ``annotations/{split}.json``, ``images/``
  h36m               h36m        ``annotation_body3d/fps50/h36m_{split}.npz``, ``images/``
                                 (mmpose's layout)
  any other          the source  ``annotations/person_keypoints_{split}.json``, ``{split}/``

``path`` of a synthetic source defaults to ``synthetic.default_root()``. The reader gets
the entry's detection file (``det_file``, ``det_score_threshold``) and its ``options``
string (``'headbox_file=/x.mat,min_keypoints=0'``); an eval split also
``sources.eval_options``.

A mix of training sources (LocLLM's 3D model trains on Human3.6M + MPII):
``config.data.train`` holds named entries instead of one, each with a ``weight``
(its share of the stream, default 1), e.g. ``train=dict(h36m=dict(source='h36m', ...,
weight=1.0), mpii=dict(source='mpii', ..., weight=1.0))``; ``train_entries`` lists them.
An entry that has a ``source`` is a single source, as before.
"""

from __future__ import annotations

import ast
import dataclasses
import os
from typing import Any, Callable, Optional

from kptjax.data import synthetic, synthetic_objects
from kptjax.errors import ConfigError

Files = tuple[str, str]   # (annotation file, image root)


def synthetic_files(entry: Any) -> Files:
  """Generates (once, cached) ``num_images`` figures of ``preset`` (``synthetic``)."""
  return synthetic.ensure_dataset(
      entry.get("path") or synthetic.default_root(), entry.preset, entry.split,
      int(entry.num_images), int(entry.get("seed", 0)), overrides=entry.get("knobs", "") or None,
      progress=True)


def synthetic_object_files(entry: Any) -> Files:
  """Generates (once, cached) MP-100-style non-human objects (``synthetic_objects``)."""
  seed = int(entry.get("seed", 0))
  root = os.path.join(entry.get("path") or synthetic.default_root(), f"objects-seed{seed}")
  return synthetic_objects.generate_objects(root, num_images=int(entry.num_images), seed=seed,
                                            split=entry.split)


@dataclasses.dataclass(frozen=True)
class SourceEntry:
  """How one source's files are found and read.

  Attributes:
    reader: the ``read_dataset`` name (None: the source's own name).
    ann_file, image_root: layout under the entry's ``path`` ({split} is filled in).
    make_files: entry -> (ann_file, image_root), for sources whose files are generated.
  """
  reader: Optional[str] = None
  ann_file: str = "annotations/person_keypoints_{split}.json"
  image_root: str = "{split}"
  make_files: Optional[Callable[[Any], Files]] = None


CATALOG: dict[str, SourceEntry] = {
    "synthetic": SourceEntry(make_files=synthetic_files),
    "synthetic_objects": SourceEntry(reader="mp100", make_files=synthetic_object_files),
    "mp100": SourceEntry(ann_file="annotations/{split}.json", image_root="images"),
    "h36m": SourceEntry(ann_file="annotation_body3d/fps50/h36m_{split}.npz", image_root="images"),
}
DEFAULT_ENTRY = SourceEntry()   # the COCO layout


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


@dataclasses.dataclass(frozen=True)
class TrainEntry:
  """One source of the training stream: its name, data entry and mixing weight."""
  name: str
  entry: Any
  weight: float


def train_entries(train: Any) -> list[TrainEntry]:
  """The sources of ``config.data.train``: [one entry, weight 1] or the named mix.

  Raises:
    ConfigError: a mix member without ``source``, a weight <= 0, or an empty mix.
  """
  if "source" in train:
    return [TrainEntry(str(train.source), train, 1.0)]
  out = []
  for name in sorted(train.keys()):
    entry = train[name]
    if not hasattr(entry, "get") or "source" not in entry:
      raise ConfigError(f"data.train.{name}: a mix member needs a 'source' (data.train is "
                        "either one source entry or named entries with weights)")
    weight = float(entry.get("weight", 1.0))
    if not weight > 0:
      raise ConfigError(f"data.train.{name}.weight={weight}: need > 0")
    out.append(TrainEntry(name, entry, weight))
  if not out:
    raise ConfigError("data.train: no source entry")
  return out


def locate(entry: Any, where: str) -> tuple[str, Files, dict[str, Any]]:
  """(reader name, (ann_file, image_root), reader options) of a data entry.

  Args:
    entry: ``config.data.train`` or ``config.data.eval``.
    where: its name in messages ('train' / 'eval').

  Raises:
    ConfigError: neither ``ann_file`` nor ``path`` is given for a source read from disk,
      or a malformed ``options`` string.
  """
  source = entry.source
  spec = CATALOG.get(source, DEFAULT_ENTRY)
  options = parse_options(entry.get("options", ""))
  if entry.get("det_file"):
    options = {"det_file": entry.det_file,
               "det_score_threshold": entry.get("det_score_threshold", 0.0), **options}
  reader = spec.reader or source
  if spec.make_files is not None:
    return reader, spec.make_files(entry), options
  ann_file, image_root = entry.get("ann_file", ""), entry.get("image_root", "")
  if not ann_file:
    if not entry.get("path"):
      raise ConfigError(f"data.{where}: give ann_file (+ image_root) or path for source "
                        f"{source!r}")
    ann_file = os.path.join(entry.path, spec.ann_file.format(split=entry.split))
    image_root = image_root or os.path.join(entry.path, spec.image_root.format(split=entry.split))
  return reader, (ann_file, image_root), options
