"""What the readers share: strict JSON loading, and field access that refuses what is
not a number.

Every numeric value a reader puts into a ``PersonRecord`` passes through ``numbers``,
``number``, ``checked_array`` or ``keypoint_rows`` here: it must be a real number (not a
string or bool), finite (no NaN / inf, which JSON files may hold as ``NaN`` /
``Infinity``), and inside the field's range (image sizes are whole numbers >= 1,
visibility flags 0 / 1 / 2, detection scores in [0, 1]). Anything else is a
``DataError`` naming the file, the record and the field. Ids must be unique
(``UniqueIds``), and categories are a list of objects with distinct integer ids
(``category_table``).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Mapping, Optional

import numpy as np
from PIL import Image

from kptjax.errors import DataError, ImageError

VISIBILITY = (0, 1, 2)      # COCO: 0 unlabeled, 1 labeled but hidden, 2 labeled and visible


def load_json(path: str | os.PathLike) -> Any:
  """Parses a JSON file; DataError naming the file when missing, malformed or too deep."""
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      return json.load(f)
  except FileNotFoundError as e:
    raise DataError(path, "file not found") from e
  except OSError as e:
    raise DataError(path, f"cannot read file: {e.strerror or e}") from e
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataError(path, f"malformed JSON: {e}", expected="a JSON document") from e
  except RecursionError as e:
    raise DataError(path, "malformed JSON: nested too deeply to parse",
                    expected="a JSON document") from e


def field(obj: Any, key: str, path, where: str, kind: Any = None, *, record: Any = None,
          default: Any = ...) -> Any:
  """``obj[key]``, checked: DataError(path, field=f'{where}.{key}') when absent or mistyped."""
  name = f"{where}.{key}" if where else key
  if not isinstance(obj, dict) or key not in obj:
    if default is not ...:
      return default
    raise DataError(path, "missing field", field=name, record=record)
  value = obj[key]
  allows_bool = kind is bool or (isinstance(kind, tuple) and bool in kind)
  bad_bool = isinstance(value, bool) and not allows_bool
  if kind is not None and (not isinstance(value, kind) or bad_bool):
    expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
    raise DataError(path, f"bad value {str(value)[:80]!r}", field=name, record=record,
                    expected=expected)
  return value


def _range_text(low: Optional[float], high: Optional[float],
                allowed: Optional[Iterable[float]]) -> str:
  if allowed is not None:
    return "one of " + ", ".join(str(v) for v in allowed)
  bounds = [f">= {low:g}"] if low is not None else []
  bounds += [f"<= {high:g}"] if high is not None else []
  return "finite numbers" + (" " + " and ".join(bounds) if bounds else "")


def checked_array(values: Any, path, name: str, *, record: Any = None,
                  low: Optional[float] = None, high: Optional[float] = None,
                  allowed: Optional[Iterable[float]] = None,
                  rows_are_records: bool = False) -> np.ndarray:
  """``values`` as float64 when every entry is a finite real number in range.

  Args:
    values: an array or nested list of numbers (any shape).
    path, name, record: the file, the field and the record, for the error.
    low, high: inclusive bounds; allowed: the only values permitted (e.g. ``VISIBILITY``).
    rows_are_records: axis 0 indexes records (an npz array): the error names the row.

  Raises:
    DataError: an entry is not a real number, not finite or out of range (the message
      gives the first such entry and its flat index).
  """
  try:
    array = np.asarray(values)
    if array.dtype.kind not in "biuf":
      raise TypeError(array.dtype)
    array = array.astype(np.float64)
  except (TypeError, ValueError) as e:
    raise DataError(path, f"bad value {str(values)[:80]!r}", field=name, record=record,
                    expected="numbers") from e
  bad = ~np.isfinite(array)
  if low is not None:
    bad |= array < low
  if high is not None:
    bad |= array > high
  if allowed is not None:
    bad |= ~np.isin(array, np.asarray(list(allowed), np.float64))
  if np.any(bad):
    index = int(np.flatnonzero(bad)[0])
    value = float(array.ravel()[index])
    row_size = int(np.prod(array.shape[1:]))
    if rows_are_records:
      record, index = divmod(index, row_size)
    where = f" at index {index}" if array.size > 1 and not (rows_are_records and
                                                            row_size == 1) else ""
    raise DataError(path, f"bad value {value!r}{where}", field=name, record=record,
                    expected=_range_text(low, high, allowed))
  return array


def _floats(values: Any) -> Optional[list[float]]:
  """The JSON numbers ``values`` as floats, or None when one is not a number (bools, text
  and ints too large for a float are not)."""
  if not all(type(v) in (int, float) for v in values):   # pylint: disable=unidiomatic-typecheck
    return None
  try:
    return [float(v) for v in values]
  except OverflowError:
    return None


def _in_range(values: list[float], low: Optional[float], high: Optional[float],
              allowed: Optional[Iterable[float]]) -> bool:
  """All finite and in [low, high] (or in ``allowed``): the fast path before the
  vectorized check that names the bad entry."""
  if allowed is not None:
    return all(v in allowed for v in values)
  return all(math.isfinite(v) and (low is None or v >= low) and (high is None or v <= high)
             for v in values)


def numbers(obj: Any, key: str, path, where: str, length: Optional[int] = None, *,
            record: Any = None, allowed: Optional[Iterable[float]] = None) -> list[float]:
  """A list of finite numbers (in ``allowed`` when given; of ``length`` when given) at
  ``obj[key]``, else DataError."""
  value = field(obj, key, path, where, (list, tuple), record=record)
  name = f"{where}.{key}"
  floats = _floats(value)
  if floats is None or (length is not None and len(value) != length):
    raise DataError(path, f"bad value {str(value)[:80]!r}", field=name, record=record,
                    expected=f"{length} numbers" if length is not None else "numbers")
  if not _in_range(floats, None, None, allowed):
    checked_array(floats, path, name, record=record, allowed=allowed)   # raises
  return floats


def number(obj: Any, key: str, path, where: str, *, record: Any = None,
           low: Optional[float] = None, high: Optional[float] = None,
           integer: bool = False, default: Any = ...) -> Any:
  """A finite number in [low, high] at ``obj[key]`` (a whole number -> int if ``integer``)."""
  value = field(obj, key, path, where, (int, float), record=record, default=default)
  if default is not ... and value is default:
    return value
  name = f"{where}.{key}"
  floats = _floats([value])
  if floats is None or not _in_range(floats, low, high, None):
    checked_array(value, path, name, record=record, low=low, high=high)   # raises
  if integer:
    if floats[0] != int(floats[0]):
      raise DataError(path, f"bad value {value!r}", field=name, record=record,
                      expected="a whole number")
    return int(floats[0])
  return floats[0]


def keypoint_rows(obj: Any, key: str, path, where: str, num: int, dims: int = 3, *,
                  record: Any = None) -> np.ndarray:
  """f32[num, dims] from the flat list ``obj[key]`` (x, y[, z], visibility per keypoint):
  finite coordinates, visibility in ``VISIBILITY``."""
  values = numbers(obj, key, path, where, dims * num, record=record)
  if not _in_range(values[dims - 1::dims], None, None, VISIBILITY):
    checked_array(values[dims - 1::dims], path, f"{where}.{key}[visibility]", record=record,
                  allowed=VISIBILITY)   # raises
  return np.asarray(values, np.float32).reshape(num, dims)


class UniqueIds:
  """Refuses an id seen before: ``ids.add(value, path, field, record)`` -> DataError."""

  def __init__(self, what: str):
    self.what = what
    self._seen: dict[Any, str] = {}

  def add(self, value: Any, path, name: str, record: Any = None) -> None:
    if value in self._seen:
      raise DataError(path, f"duplicate {self.what} {value!r} (also at {self._seen[value]})",
                      field=name, record=record, expected=f"unique {self.what}s")
    self._seen[value] = name


def annotation_ids(ann: Any, index: int, ids: UniqueIds, images: Mapping[int, Any], path: str,
                   where: str) -> tuple[int, int]:
  """(``id`` (default: its index), ``image_id``) of an annotation: the id unique, the
  image one of ``images``."""
  ann_id = field(ann, "id", path, where, int, default=index)
  ids.add(ann_id, path, f"{where}.id", record=ann_id)
  image_id = field(ann, "image_id", path, where, int, record=ann_id)
  if image_id not in images:
    raise DataError(path, f"image_id {image_id} is not in 'images'", field=f"{where}.image_id",
                    record=ann_id)
  return ann_id, image_id


def image_table(data: Any, path) -> dict[int, tuple[str, tuple[int, int]]]:
  """COCO ``images``: id -> (file_name, (width, height)); unique ids, sizes whole >= 1."""
  table = {}
  ids = UniqueIds("image id")
  for i, img in enumerate(field(data, "images", path, "", list)):
    where = f"images[{i}]"
    image_id = field(img, "id", path, where, int)
    ids.add(image_id, path, f"{where}.id", record=image_id)
    size = tuple(number(img, key, path, where, record=image_id, low=1, integer=True)
                 for key in ("width", "height"))
    table[image_id] = (field(img, "file_name", path, where, str), size)
  return table


def category_table(data: Any, path) -> dict[int, dict[str, Any]]:
  """COCO ``categories``: id -> the category object; a list of objects with unique int ids."""
  table = {}
  ids = UniqueIds("category id")
  for i, cat in enumerate(field(data, "categories", path, "", list)):
    where = f"categories[{i}]"
    if not isinstance(cat, dict):
      raise DataError(path, f"bad value {str(cat)[:80]!r}", field=where,
                      expected="an object {id, name, ...}")
    cat_id = field(cat, "id", path, where, int)
    ids.add(cat_id, path, f"{where}.id")
    table[cat_id] = cat
  return table


def known_category(category: int, categories: dict[int, Any], path, name: str,
                   record: Any = None) -> int:
  """``category`` when it is a key of ``categories``, else DataError."""
  if category not in categories:
    raise DataError(path, f"category_id {category} is not in 'categories'", field=name,
                    record=record, expected=f"one of {sorted(categories)[:20]}")
  return category


def image_size(path: str) -> Optional[tuple[int, int]]:
  """(width, height) read from the image header, or None when the file is missing."""
  try:
    with Image.open(path) as img:
      return int(img.size[0]), int(img.size[1])
  except FileNotFoundError:
    return None
  except OSError as e:
    raise ImageError(path, f"cannot read image header: {e}", field="image") from e


class ExistsCache:
  """os.path.exists memoized per path (many persons share one image)."""

  def __init__(self):
    self._cache: dict[str, bool] = {}

  def __call__(self, path: str) -> bool:
    hit = self._cache.get(path)
    if hit is None:
      hit = self._cache[path] = os.path.exists(path)
    return hit
