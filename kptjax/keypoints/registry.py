"""Keypoint spec files and the registry of named specs.

A spec file (YAML or JSON) describes one body model::

  name: my_body            # the spec name, required
  base: coco17             # optional: start from a registered spec, append keypoints
  subject: person          # optional: the word questions use ('person', 'animal', ...)
  root: pelvis             # optional: root joint for 3D data
  description: ...         # optional: one line about the body model
  descriptions_from: human_descriptions.yaml   # optional: name -> description library
  keypoints:               # appended to the base's keypoints
    - {name: neck, description: "The neck is ...", flip: null, sigma: 0.079}
    - {name: left toe, flip: right toe}      # description from the library
    - right toe                              # a bare name: description from the library
  skeleton:                # pairs of keypoint names (or indices)
    - [left toe, left ankle]

A keypoint's description is the one it gives, else the library's entry for its
name (``descriptions_from``: a path relative to the spec file, else a file in
``kptjax/keypoints/data``), else the file is rejected. ``flip`` names the keypoint
a horizontal flip swaps it with; giving it on one side of a pair is enough.
``sigma`` is the OKS sigma; the spec has sigmas only if every keypoint has one.

Bad input: an unreadable or malformed file, a missing field, a duplicate or unknown
keypoint name (flip partner, skeleton end, root) or an unknown base spec raises
``DataError`` naming the file and the field (``keypoints[3].flip``).

Built-in specs live in ``kptjax/keypoints/data/*.yaml``: coco17, coco17+neck_pelvis,
humanart21, mpii16, h36m17, ap10k17, crowdpose14, aic14.
"""

from __future__ import annotations

import json
import os
import pathlib
import threading
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import yaml

from kptjax.errors import DataError
from kptjax.keypoints.spec import KeypointSpec

DATA_DIR = pathlib.Path(__file__).resolve().parent / "data"
_REGISTRY: dict[str, KeypointSpec] = {}
_BUILTIN_FILES: Optional[dict[str, pathlib.Path]] = None
_LOCK = threading.RLock()


def _read_mapping(path: pathlib.Path) -> Any:
  """Parses a YAML or JSON file; DataError if it cannot be read or parsed."""
  try:
    text = path.read_text(encoding="utf-8")
  except OSError as e:
    raise DataError(path, f"cannot read file: {e.strerror or e}") from e
  try:
    if path.suffix.lower() == ".json":
      return json.loads(text)
    return yaml.safe_load(text)
  except (json.JSONDecodeError, yaml.YAMLError) as e:
    raise DataError(path, f"malformed {path.suffix.lstrip('.').upper() or 'YAML'}: {e}") from e


def _builtin_files() -> dict[str, pathlib.Path]:
  """Spec name -> file for every spec file shipped in kptjax/keypoints/data."""
  global _BUILTIN_FILES
  with _LOCK:
    if _BUILTIN_FILES is None:
      files = {}
      for path in sorted(DATA_DIR.iterdir()):
        if path.suffix.lower() not in (".yaml", ".yml", ".json"):
          continue
        data = _read_mapping(path)
        if isinstance(data, Mapping) and "keypoints" in data and "name" in data:
          files[str(data["name"])] = path
      _BUILTIN_FILES = files
    return _BUILTIN_FILES


def _load_descriptions(ref: str, spec_path: pathlib.Path) -> dict[str, str]:
  candidates = [spec_path.parent / ref, DATA_DIR / ref]
  for path in candidates:
    if path.exists():
      data = _read_mapping(path)
      if not isinstance(data, Mapping):
        raise DataError(path, "a description library must map names to text",
                        expected="mapping name -> description")
      return {str(k): str(v) for k, v in data.items()}
  raise DataError(spec_path, f"description library '{ref}' not found",
                  field="descriptions_from", expected=f"a file beside the spec or in {DATA_DIR}")


def _resolve_name(value: Any, names: Sequence[str], path, field: str) -> int:
  """A keypoint referenced by name (or index) -> index; DataError if unknown."""
  if isinstance(value, bool):
    value = str(value)
  if isinstance(value, int):
    if 0 <= value < len(names):
      return value
    raise DataError(path, f"keypoint index {value} out of range", field=field,
                    expected=f"0..{len(names) - 1}")
  if isinstance(value, str) and value in names:
    return names.index(value)
  raise DataError(path, f"unknown keypoint name {value!r}", field=field,
                  expected=f"one of {list(names)}")


def spec_from_dict(data: Any, path: Union[str, os.PathLike] = "<dict>") -> KeypointSpec:
  """Builds a KeypointSpec from the parsed content of a spec file (schema above)."""
  path = pathlib.Path(path) if not isinstance(path, pathlib.Path) else path
  if not isinstance(data, Mapping):
    raise DataError(path, "a spec file must hold a mapping", expected="name, keypoints, ...")
  name = data.get("name")
  if not isinstance(name, str) or not name:
    raise DataError(path, "missing or empty spec name", field="name", expected="a string")

  names: list[str] = []
  descriptions: list[str] = []
  sigmas: list[Optional[float]] = []
  partner: dict[int, int] = {}
  skeleton: list[tuple[int, int]] = []
  subject, root_index, description = "person", None, ""

  base_name = data.get("base")
  if base_name is not None:
    try:
      base = get_spec(str(base_name))
    except KeyError as e:
      raise DataError(path, f"unknown base spec {base_name!r}", field="base",
                      expected=f"one of {list_specs()}") from e
    names, descriptions = list(base.names), list(base.descriptions)
    sigmas = list(base.sigmas) if base.sigmas is not None else [None] * len(names)
    perm = base.flip_permutation()
    partner = {i: int(j) for i, j in enumerate(perm) if int(j) != i}
    skeleton = list(base.skeleton)
    subject, root_index, description = base.subject, base.root_index, base.description

  library: dict[str, str] = {}
  if data.get("descriptions_from"):
    library = _load_descriptions(str(data["descriptions_from"]), path)

  entries = data.get("keypoints")
  if not isinstance(entries, list) or (not entries and base_name is None):
    raise DataError(path, "missing keypoint list", field="keypoints",
                    expected="a non-empty list of {name, description, flip, sigma}")
  flips: list[tuple[int, Any, str]] = []
  for i, entry in enumerate(entries):
    field = f"keypoints[{i}]"
    if isinstance(entry, str):
      entry = {"name": entry}
    if not isinstance(entry, Mapping):
      raise DataError(path, "a keypoint must be a name or a mapping", field=field,
                      expected="{name, description, flip, sigma}")
    unknown = set(entry) - {"name", "description", "flip", "sigma"}
    if unknown:
      raise DataError(path, f"unknown keys {sorted(unknown)}", field=field,
                      expected="name, description, flip, sigma")
    kp_name = entry.get("name")
    if not isinstance(kp_name, str) or not kp_name.strip():
      raise DataError(path, "missing keypoint name", field=f"{field}.name", expected="a string")
    if kp_name in names:
      raise DataError(path, f"duplicate keypoint name {kp_name!r}", field=f"{field}.name")
    text = entry.get("description") or library.get(kp_name)
    if not isinstance(text, str) or not text.strip():
      raise DataError(path, f"no description for keypoint {kp_name!r}",
                      field=f"{field}.description",
                      expected="a description, or a descriptions_from library holding the name")
    sigma = entry.get("sigma")
    if sigma is not None:
      try:
        sigma = float(sigma)
      except (TypeError, ValueError) as e:
        raise DataError(path, f"sigma {sigma!r} is not a number", field=f"{field}.sigma") from e
      if not sigma > 0:
        raise DataError(path, f"sigma {sigma} must be positive", field=f"{field}.sigma")
    names.append(kp_name)
    descriptions.append(text.strip())
    sigmas.append(sigma)
    if entry.get("flip") is not None:
      flips.append((len(names) - 1, entry["flip"], f"{field}.flip"))

  for i, other, field in flips:
    j = _resolve_name(other, names, path, field)
    if j == i:
      continue
    for a, b in ((i, j), (j, i)):
      if partner.get(a, b) != b:
        raise DataError(path, f"{names[a]!r} is paired with both {names[partner[a]]!r} and "
                        f"{names[b]!r}", field=field, expected="one flip partner per keypoint")
    partner[i], partner[j] = j, i

  for k, pair in enumerate(data.get("skeleton") or []):
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
      raise DataError(path, f"bad limb {pair!r}", field=f"skeleton[{k}]", expected="[name, name]")
    skeleton.append((_resolve_name(pair[0], names, path, f"skeleton[{k}]"),
                     _resolve_name(pair[1], names, path, f"skeleton[{k}]")))

  if data.get("root") is not None:
    root_index = _resolve_name(data["root"], names, path, "root")
  subject = str(data.get("subject", subject))
  description = str(data.get("description", description))
  flip_pairs = tuple(sorted((i, j) for i, j in partner.items() if i < j))
  return KeypointSpec(
      name=name, names=tuple(names), descriptions=tuple(descriptions),
      flip_pairs=flip_pairs,
      sigmas=tuple(sigmas) if all(s is not None for s in sigmas) else None,
      skeleton=tuple(skeleton), subject=subject, root_index=root_index,
      description=description)


def load_spec_file(path: Union[str, os.PathLike], *, register: bool = False) -> KeypointSpec:
  """Reads a YAML/JSON spec file (schema in the module docstring).

  Args:
    path: the file.
    register: also register the spec under its name (replacing one of that name).

  Raises:
    DataError: naming the file and the field, for any malformed or unknown entry.
  """
  path = pathlib.Path(path)
  spec = spec_from_dict(_read_mapping(path), path)
  if register:
    register_spec(spec, overwrite=True)
  return spec


def register_spec(spec: KeypointSpec, *, overwrite: bool = False) -> KeypointSpec:
  """Makes ``get_spec(spec.name)`` return ``spec``.

  Raises:
    ValueError: a different spec of that name is registered and ``overwrite`` is False.
  """
  with _LOCK:
    old = _REGISTRY.get(spec.name)
    if old is not None and old != spec and not overwrite:
      raise ValueError(f"a different keypoint spec named {spec.name!r} is registered; "
                       "pass overwrite=True to replace it")
    _REGISTRY[spec.name] = spec
  return spec


def get_spec(name: Union[str, KeypointSpec, os.PathLike]) -> KeypointSpec:
  """The spec of that name (registered or built in), or the spec in that file.

  Args:
    name: a spec name ('coco17'), a KeypointSpec (returned as is), or the path of
      a spec file ('.yaml', '.yml', '.json'), which is loaded and registered.

  Raises:
    KeyError: no spec of that name.
    DataError: the named file is malformed.
  """
  if isinstance(name, KeypointSpec):
    return name
  key = os.fspath(name)
  with _LOCK:
    if key in _REGISTRY:
      return _REGISTRY[key]
    files = _builtin_files()
    if key in files:
      return register_spec(spec_from_dict(_read_mapping(files[key]), files[key]))
  if key.lower().endswith((".yaml", ".yml", ".json")) and os.path.exists(key):
    return load_spec_file(key, register=True)
  raise KeyError(f"unknown keypoint spec {key!r}; known: {list_specs()}")


def list_specs(builtin_only: bool = False) -> list[str]:
  """Names of the built-in and registered specs (only the bundled files' with
  ``builtin_only``: what ships with kptjax, whatever a program registered since)."""
  with _LOCK:
    return sorted(set(_builtin_files()) | (set() if builtin_only else set(_REGISTRY)))


def make_spec(name: str, keypoints: Iterable[Union[tuple[str, str], Mapping[str, Any]]], *,
              base: Optional[str] = None, subject: Optional[str] = None,
              register: bool = True) -> KeypointSpec:
  """Builds a spec in code, e.g. novel keypoints asked by description.

  Args:
    name: the new spec's name.
    keypoints: (name, description) pairs or mappings as in a spec file.
    base: optional spec whose keypoints come first.
    subject: the word questions use for the instance.
    register: register the spec under ``name``.
  """
  entries = [dict(k) if isinstance(k, Mapping) else {"name": k[0], "description": k[1]}
             for k in keypoints]
  data: dict[str, Any] = {"name": name, "keypoints": entries}
  if base is not None:
    data["base"] = base
  if subject is not None:
    data["subject"] = subject
  spec = spec_from_dict(data, f"<make_spec {name}>")
  return register_spec(spec, overwrite=True) if register else spec
