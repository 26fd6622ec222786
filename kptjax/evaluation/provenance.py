"""Provenance records: what made a result (or a workdir), and whether two records agree.

One record is a JSON-able dict::

    {"kptjax_version": "0.1.0",
     "checkpoint": {"path": "/abs/workdir", "step": 2100},      # step None: no checkpoint
     "config_sha256": {"model": "…", "decode": "…", "data": "…"},
     "dataset": {"spec": <the dataset string or config dict>,
                 "files": {"/abs/ann.json": {"size": 123, "mtime_ns": 1700000000000000000}}},
     "evaluation": {...}}                                        # run options, free form

:func:`build` makes one, :func:`compare` lists the dotted names of the fields where two
records differ (``[]`` = the same provenance). Files are identified by size and
modification time (never read). Hashes are SHA-256 of the canonical JSON (sorted keys)
of each config section, so two configs that print the same hash the same.

Used by ``kptjax.evaluation.results`` (``metrics.json`` and the
predictions' sidecar carry the record; earlier results and partial predictions are reused
only when :func:`compare` returns nothing) and meant for training workdirs too.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable, Mapping, Optional, Sequence

import kptjax


def config_hash(section: Any) -> str:
  """SHA-256 hex of a config section (a ConfigDict, a dict, or any JSON-able value)."""
  if hasattr(section, "to_dict"):
    section = section.to_dict()
  text = json.dumps(section, sort_keys=True, default=str, separators=(",", ":"))
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_stamps(paths: Iterable[str]) -> dict[str, dict[str, int]]:
  """{absolute path: {'size': bytes, 'mtime_ns': int}} of the paths that are files."""
  out = {}
  for path in paths:
    path = os.path.abspath(os.fspath(path))
    if os.path.isfile(path):
      st = os.stat(path)
      out[path] = {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}
  return out


def build(*, checkpoint: str = "", step: Optional[int] = None,
          configs: Optional[Mapping[str, Any]] = None, dataset: Any = None,
          files: Sequence[str] = (), evaluation: Optional[Mapping[str, Any]] = None
          ) -> dict[str, Any]:
  """One provenance record.

  Args:
    checkpoint: the checkpoint path as given ('' = none: config weights); stored absolute.
    step: the checkpoint step the weights came from (None = no kptjax checkpoint).
    configs: {name: config section} hashed one by one (e.g. model, decode, data).
    dataset: what names the data (a '--dataset' string or the config's data dict).
    files: data files whose size and mtime identify their content (non-files ignored).
    evaluation: run options that change the result (JSON-able, stored as is).
  """
  record = {
      "kptjax_version": kptjax.__version__,
      "checkpoint": {"path": os.path.abspath(checkpoint) if checkpoint else "",
                     "step": None if step is None else int(step)},
      "config_sha256": {k: config_hash(v) for k, v in sorted((configs or {}).items())},
      "dataset": {"spec": _jsonable(dataset), "files": file_stamps(files)},
  }
  if evaluation is not None:
    record["evaluation"] = _jsonable(dict(evaluation))
  return record


def compare(saved: Optional[Mapping[str, Any]], current: Mapping[str, Any],
            ignore: Sequence[str] = ()) -> list[str]:
  """Dotted names of the fields where ``saved`` and ``current`` differ, sorted.

  A field present in only one of them differs; ``saved=None`` (no record) differs in
  '<missing record>'. ``ignore``: top-level fields left out (e.g. 'evaluation').
  """
  if saved is None:
    return ["<missing record>"]
  out: list[str] = []
  _diff(_jsonable(dict(saved)), _jsonable(dict(current)), "", set(ignore), out)
  return sorted(out)


def _diff(a: Any, b: Any, prefix: str, ignore: set[str], out: list[str]) -> None:
  if isinstance(a, dict) and isinstance(b, dict):
    for key in sorted(set(a) | set(b)):
      if not prefix and key in ignore:
        continue
      name = f"{prefix}.{key}" if prefix else str(key)
      if key not in a or key not in b:
        out.append(name)
      else:
        _diff(a[key], b[key], name, ignore, out)
  elif a != b:
    out.append(prefix or "<record>")


def _jsonable(value: Any) -> Any:
  """The value as it reads back from JSON (tuples -> lists, ConfigDicts -> dicts)."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  return json.loads(json.dumps(value, sort_keys=True, default=str))
