"""Where files live: one path type for local disk and cloud buckets, and atomic writes.

Every file the project writes goes through :func:`write_atomic` (or its JSON / text
forms): the bytes go to a hidden temporary sibling that is then renamed over the target,
so a reader (another host, a resumed run, a sweep) never sees a half-written file and a
killed writer leaves at most a ``.NAME.tmp-PID`` file beside it. Paths are
``etils.epath.Path``: a local path, or ``gs://bucket/...`` where a bucket filesystem is
installed (``pip install 'kptjax[gcs]'``).
"""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath

PathLike = str | os.PathLike


def path(p: PathLike) -> epath.Path:
  """``p`` as an ``epath.Path`` (local, or ``gs://`` / other registered schemes)."""
  return epath.Path(p)


def is_local(p: PathLike) -> bool:
  """True for a path on this machine's filesystem (no ``scheme://``)."""
  return "://" not in os.fspath(p)


def write_atomic(p: PathLike, data: bytes | str) -> None:
  """Writes ``data`` to ``p`` through a temporary sibling renamed over it; makes parents."""
  target = path(p)
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
  raw = data.encode("utf-8") if isinstance(data, str) else data
  with tmp.open("wb") as f:
    f.write(raw)
    if is_local(tmp):
      f.flush()
      os.fsync(f.fileno())
  tmp.replace(target)


def write_json_atomic(p: PathLike, obj: Any, indent: int | None = 1, **kwargs: Any) -> None:
  """``json.dumps(obj, indent=indent, **kwargs)`` written atomically to ``p``."""
  write_atomic(p, json.dumps(obj, indent=indent, **kwargs))
