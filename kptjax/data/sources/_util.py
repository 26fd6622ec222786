"""Helpers the readers share: strict JSON loading and field access with DataError."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from PIL import Image

from kptjax.errors import DataError


def load_json(path: str | os.PathLike) -> Any:
  """Parses a JSON file; DataError naming the file when missing or malformed."""
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


def numbers(obj: Any, key: str, path, where: str, length: Optional[int] = None, *,
            record: Any = None) -> list[float]:
  """A list of numbers (of ``length`` when given) at ``obj[key]``, else DataError."""
  value = field(obj, key, path, where, (list, tuple), record=record)
  if (length is not None and len(value) != length) or not all(
      isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
    raise DataError(path, f"bad value {str(value)[:80]!r}", field=f"{where}.{key}",
                    record=record,
                    expected=f"{length} numbers" if length is not None else "numbers")
  return [float(v) for v in value]


def image_size(path: str) -> Optional[tuple[int, int]]:
  """(width, height) read from the image header, or None when the file is missing."""
  try:
    with Image.open(path) as img:
      return int(img.size[0]), int(img.size[1])
  except FileNotFoundError:
    return None
  except OSError as e:
    raise DataError(path, f"cannot read image header: {e}", field="image") from e


class ExistsCache:
  """os.path.exists memoized per path (many persons share one image)."""

  def __init__(self):
    self._cache: dict[str, bool] = {}

  def __call__(self, path: str) -> bool:
    hit = self._cache.get(path)
    if hit is None:
      hit = self._cache[path] = os.path.exists(path)
    return hit
