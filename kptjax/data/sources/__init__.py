"""Dataset readers: one per annotation format, each returning Records (a list of
PersonRecord / CaptionRecord in original-image pixels, with ``.skipped`` counts).

``read_dataset(name, **kwargs)`` dispatches by the config's source name:

  name        reader                 defaults it sets
  synthetic   read_coco_keypoints    spec='coco17' (files made by data/synthetic.py)
  coco        read_coco_keypoints    spec='coco17'
  humanart    read_coco_keypoints    spec='coco17', image_prefix_strip='HumanArt/images/'
  ap10k       read_coco_keypoints    spec='ap10k17'
  crowdpose   read_coco_keypoints    spec='crowdpose14'
  ochuman     read_coco_keypoints    spec='coco17'
  aic         read_coco_keypoints    spec='aic14'
  mpii        read_mpii_json         spec='mpii16'
  h36m        read_h36m              spec='h36m17'
  mp100       read_mp100             one spec per category
  ap10k_family read_ap10k_families   spec='ap10k17', ``families='Canidae'`` (sources/ap10k.py)
  llava       read_llava_captions    -

Each reader takes the annotation file and the image root first (positional or
``ann_file=`` / ``image_root=``); other keyword arguments override the defaults.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

from kptjax.data.sources.ap10k import read_ap10k_families
from kptjax.data.sources.base import CaptionRecord, PersonRecord, Records, specs_of
from kptjax.data.sources.coco import read_coco_keypoints, read_mp100, sanitize_box
from kptjax.data.sources.h36m import read_h36m
from kptjax.data.sources.llava import read_llava_captions
from kptjax.data.sources.mpii import read_mpii_json
from kptjax.errors import ConfigError

_COCO_FORMAT = {
    "synthetic": dict(spec="coco17"),
    "coco": dict(spec="coco17"),
    "humanart": dict(spec="coco17", image_prefix_strip="HumanArt/images/"),
    "ap10k": dict(spec="ap10k17"),
    "crowdpose": dict(spec="crowdpose14"),
    "ochuman": dict(spec="coco17"),
    "aic": dict(spec="aic14"),
}

READERS: dict[str, Callable[..., Records]] = {
    **{name: functools.partial(read_coco_keypoints, dataset=name, **defaults)
       for name, defaults in _COCO_FORMAT.items()},
    "mpii": read_mpii_json,
    "h36m": read_h36m,
    "mp100": read_mp100,
    "ap10k_family": read_ap10k_families,
    "llava": read_llava_captions,
}


def read_dataset(name: str, *args: Any, **kwargs: Any) -> Records:
  """Reads dataset ``name`` with its reader (table in the module docstring).

  ``ann_file`` / ``json_file`` and ``image_root`` may be given by keyword under
  either name; other keywords go to the reader and override its defaults. String
  values (from a command line) are converted to the type of the reader's default
  (``min_keypoints='0'`` -> 0, ``check_images='false'`` -> False).

  Raises:
    ConfigError: unknown name or a keyword the reader does not take.
  """
  if name not in READERS:
    raise ConfigError(f"unknown data source {name!r}; choose from {sorted(READERS)}")
  reader = READERS[name]
  target = reader.func if isinstance(reader, functools.partial) else reader
  first = list(inspect.signature(target).parameters)[0]
  for alias in ("ann_file", "json_file"):
    if alias in kwargs and alias != first:
      kwargs[first] = kwargs.pop(alias)
  params = inspect.signature(reader).parameters
  for key, value in list(kwargs.items()):
    if isinstance(value, str) and key in params:
      kwargs[key] = _coerce(name, key, value, params[key].default)
  try:
    inspect.signature(reader).bind(*args, **kwargs)
  except TypeError as e:
    raise ConfigError(f"data source {name!r}: {e}") from e
  return reader(*args, **kwargs)


def reader_accepts(name: str, key: str) -> bool:
  """Whether the reader of dataset ``name`` takes keyword ``key``."""
  return name in READERS and key in inspect.signature(READERS[name]).parameters


def eval_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
  """``options`` for reading an evaluation split: a person whose image file is missing is
  kept (``check_images=False``, unless the options say otherwise), so evaluation scores
  it as missing instead of dropping it from the denominator."""
  if reader_accepts(name, "check_images") and "check_images" not in options:
    return {**options, "check_images": False}
  return dict(options)


def _coerce(source: str, key: str, value: str, default: Any) -> Any:
  """A command-line string -> the type of the reader's default (bool, int, float)."""
  try:
    if isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(value)
      return value.lower() in ("true", "1", "yes")
    if isinstance(default, int):
      return int(value)
    if isinstance(default, float):
      return float(value)
  except ValueError as e:
    raise ConfigError(f"data source {source!r}: {key}={value!r} is not a "
                      f"{type(default).__name__}") from e
  return value


__all__ = ["CaptionRecord", "PersonRecord", "READERS", "Records", "read_coco_keypoints",
           "read_dataset", "read_h36m", "read_llava_captions", "read_mp100", "read_mpii_json",
           "sanitize_box", "specs_of"]
