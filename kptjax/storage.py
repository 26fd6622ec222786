"""Where files live: one path type for local disk and cloud buckets, and atomic writes.

Every file the project writes goes through :func:`write_atomic` (or its JSON form, or
:func:`open_atomic` for a file written in pieces, e.g. safetensors): the bytes go to a hidden temporary sibling that is then renamed over the target,
so a reader (another host, a resumed run, a sweep) never sees a half-written file and a
killed writer leaves at most a ``.NAME.tmp-PID`` file beside it. Logs that grow line by
line (``metrics.jsonl``) use :func:`append_text`. Paths are
``etils.epath.Path``: a local path, or ``gs://bucket/...`` where a bucket filesystem is
installed (``pip install 'kptjax[gcs]'``).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import IO, Any

from etils import epath

PathLike = str | os.PathLike


def path(p: PathLike) -> epath.Path:
  """``p`` as an ``epath.Path`` (local, or ``gs://`` / other registered schemes)."""
  return epath.Path(p)


def is_local(p: PathLike) -> bool:
  """True for a path on this machine's filesystem (no ``scheme://``)."""
  return "://" not in os.fspath(p)


@contextlib.contextmanager
def open_atomic(p: PathLike) -> Iterator[IO[bytes]]:
  """A binary file whose bytes appear at ``p`` only if the block ends without error.

  They go to a hidden temporary sibling (parents made), renamed over ``p`` at the end; an
  error in the block removes the sibling and leaves ``p`` as it was.
  """
  target = path(p)
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
  try:
    with tmp.open("wb") as f:
      yield f
      if is_local(tmp):
        f.flush()
        os.fsync(f.fileno())
  except BaseException:
    if tmp.exists():
      tmp.unlink()
    raise
  tmp.replace(target)


def write_atomic(p: PathLike, data: bytes | str) -> None:
  """Writes ``data`` to ``p`` through a temporary sibling renamed over it; makes parents."""
  with open_atomic(p) as f:
    f.write(data.encode("utf-8") if isinstance(data, str) else data)


def append_text(p: PathLike, text: str) -> None:
  """Appends ``text`` to ``p`` (made with its parents if missing).

  Local files are opened in append mode. A bucket object cannot be appended to: it is
  read and written again whole (atomically), so keep such files small (``metrics.jsonl``
  gets one line per logged step).
  """
  target = path(p)
  if is_local(target):
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("a", encoding="utf-8") as f:
      f.write(text)
    return
  write_atomic(target, (target.read_text() if target.exists() else "") + text)


def write_json_atomic(p: PathLike, obj: Any, indent: int | None = 1, **kwargs: Any) -> None:
  """``json.dumps(obj, indent=indent, **kwargs)`` written atomically to ``p``."""
  write_atomic(p, json.dumps(obj, indent=indent, **kwargs))
