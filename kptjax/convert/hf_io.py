"""Reading Hugging Face checkpoint directories (config.json and tensors); writing
.safetensors files.

Supports single ``model.safetensors``, sharded ``model.safetensors.index.json``, and
``pytorch_model*.bin`` (through torch, when installed). Tensors are returned as numpy
arrays in their stored dtype (bf16 stays bf16 through ``ml_dtypes``), one at a time, so a
7B checkpoint is never held twice.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Iterator, Mapping

import ml_dtypes
import numpy as np

from kptjax import storage
from kptjax.errors import CheckpointError


def read_config(ckpt_dir: str | pathlib.Path) -> dict:
  """config.json of a Hugging Face checkpoint dir as a dict."""
  path = pathlib.Path(ckpt_dir) / "config.json"
  if not path.exists():
    raise CheckpointError(f"{path}: not found (expected a Hugging Face checkpoint dir)")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: malformed JSON: {e}") from e


def _weight_files(ckpt_dir: pathlib.Path) -> list[pathlib.Path]:
  for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
    index = ckpt_dir / index_name
    if index.exists():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
      except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index}: field 'weight_map' missing or malformed") from e
      files = sorted(set(weight_map.values()))
      missing = [f for f in files if not (ckpt_dir / f).exists()]
      if missing:
        raise CheckpointError(f"{index}: shard files missing: {missing}")
      return [ckpt_dir / f for f in files]
  for pattern in ("*.safetensors", "pytorch_model*.bin"):
    files = sorted(ckpt_dir.glob(pattern))
    if files:
      return files
  raise CheckpointError(f"{ckpt_dir}: no *.safetensors or pytorch_model*.bin weights found")


def _torch_to_numpy(t) -> np.ndarray:
  import torch  # pylint: disable=g-import-not-at-top
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}

_DTYPE_CODES = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}


def _safetensors_header(path: pathlib.Path) -> tuple[int, dict]:
  """(header length, header dict without ``__metadata__``) of a .safetensors file."""
  try:
    with storage.path(path).open("rb") as fh:
      header_len = int(np.frombuffer(fh.read(8), dtype="<u8")[0])
      header = json.loads(fh.read(header_len))
  except (OSError, ValueError, IndexError) as e:
    raise CheckpointError(f"{path}: cannot read safetensors header: {e}") from e
  header.pop("__metadata__", None)
  return header_len, header


def tensor_shapes(ckpt_dir: str | pathlib.Path) -> dict[str, tuple[int, ...]] | None:
  """{name: shape} of every tensor from the safetensors headers alone (no data read);
  None for ``pytorch_model*.bin`` checkpoints (their names need the whole file)."""
  files = _weight_files(pathlib.Path(ckpt_dir))
  if any(f.suffix != ".safetensors" for f in files):
    return None
  return {name: tuple(info["shape"]) for f in files
          for name, info in _safetensors_header(f)[1].items()}


def _iter_safetensors(path: pathlib.Path) -> Iterator[tuple[str, np.ndarray]]:
  """Reads a .safetensors file directly (8-byte header length, JSON header, raw data).

  safetensors' own numpy backend cannot represent bf16, so the header is parsed here and
  each tensor is copied out of a memory map in its stored dtype, one at a time.
  """
  header_len, header = _safetensors_header(path)
  if storage.is_local(path):
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
  else:   # a bucket object cannot be memory-mapped: read it whole (adapters are small)
    data = np.frombuffer(storage.path(path).read_bytes(), np.uint8)[8 + header_len:]
  for name, info in header.items():
    dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
    if dtype is None:
      raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')}")
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if end - begin != int(np.prod(shape)) * np.dtype(dtype).itemsize or end > data.size:
      raise CheckpointError(f"{path}: tensor {name!r} data size does not match shape {shape}")
    yield name, np.array(data[begin:end].view(dtype).reshape(shape))
  del data


def iter_tensors(ckpt_dir: str | pathlib.Path) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (name, numpy array) for every tensor of the checkpoint, in stored dtype."""
  ckpt_dir = pathlib.Path(ckpt_dir)
  for f in _weight_files(ckpt_dir):
    if f.suffix == ".safetensors":
      yield from _iter_safetensors(f)
    else:
      try:
        import torch  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise CheckpointError(
            f"{f}: reading .bin checkpoints needs torch: pip install 'kptjax[torch]'") from e
      state = torch.load(str(f), map_location="cpu", weights_only=True)
      for name in list(state):
        yield name, _torch_to_numpy(state.pop(name))


def load_tensors(ckpt_dir: str | pathlib.Path) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint as {name: array} (stored dtype)."""
  return dict(iter_tensors(ckpt_dir))


def write_safetensors(path: str | pathlib.Path, tensors: Mapping[str, Any],
                      metadata: Mapping[str, str] | None = None) -> int:
  """Writes {name: array} as a .safetensors file, one tensor at a time (bf16 stays bf16).

  Arrays may be numpy, jax or non-contiguous views; each is made contiguous only while
  it is written; the file appears only when complete (``storage.open_atomic``; local or
  gs://). Returns the number of data bytes written.
  """
  names = list(tensors)
  header: dict[str, Any] = {}
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  offset = 0
  for name in names:
    t = tensors[name]
    dtype = np.dtype(t.dtype)
    code = _DTYPE_CODES.get(dtype)
    if code is None:
      raise CheckpointError(f"{path}: tensor {name!r}: dtype {dtype} cannot be written")
    size = int(np.prod(t.shape)) * dtype.itemsize
    header[name] = {"dtype": code, "shape": [int(s) for s in t.shape],
                    "data_offsets": [offset, offset + size]}
    offset += size
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)   # data section 8-byte aligned
  with storage.open_atomic(path) as fh:
    fh.write(np.array([len(blob)], dtype="<u8").tobytes())
    fh.write(blob)
    for name in names:
      fh.write(memoryview(np.ascontiguousarray(np.asarray(tensors[name])).reshape(-1).view(np.uint8)))
  return offset


def read_safetensors(path: str | pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """A .safetensors file as ({name: array in stored dtype}, metadata dict)."""
  path = storage.path(path)
  if not path.exists():
    raise CheckpointError(f"{path}: not found")
  with path.open("rb") as fh:
    header_len = int(np.frombuffer(fh.read(8), dtype="<u8")[0])
    metadata = json.loads(fh.read(header_len)).get("__metadata__", {}) or {}
  return dict(_iter_safetensors(path)), metadata
