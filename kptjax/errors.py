"""The project's exception types: every bad file or field raises one of these."""

from __future__ import annotations

from typing import Any


class KptjaxError(Exception):
  """Base class of all kptjax errors."""


class DataError(KptjaxError, ValueError):
  """A data file or one of its records is malformed.

  The message names the file, the record (if any), the field and what was expected.
  """

  def __init__(self, path: Any, message: str, *, field: str | None = None,
               record: Any = None, expected: str | None = None):
    self.path, self.field, self.record, self.expected = path, field, record, expected
    parts = [f"{path}"]
    if record is not None:
      parts.append(f"record {record}")
    if field is not None:
      parts.append(f"field '{field}'")
    text = ": ".join([", ".join(parts), message])
    if expected is not None:
      text += f" (expected {expected})"
    super().__init__(text)


class ImageError(DataError):
  """An image file is missing or cannot be decoded (a DataError with field 'image')."""


class CheckpointError(KptjaxError, ValueError):
  """A checkpoint is missing a tensor, has one of the wrong shape, or cannot be read."""


class ConfigError(KptjaxError, ValueError):
  """A config value is invalid or inconsistent."""
