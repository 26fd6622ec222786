"""Reading Hugging Face checkpoint directories: config.json and tensors.

Supports single ``model.safetensors``, sharded ``model.safetensors.index.json``, and
``pytorch_model*.bin`` (through torch, when installed). Tensors are returned as numpy
arrays in their stored dtype (bf16 stays bf16 through ``ml_dtypes``), one at a time, so a
7B checkpoint is never held twice.
"""

from __future__ import annotations

import json
import pathlib
from typing import Iterator

import ml_dtypes
import numpy as np

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


def iter_tensors(ckpt_dir: str | pathlib.Path) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (name, numpy array) for every tensor of the checkpoint, in stored dtype."""
  ckpt_dir = pathlib.Path(ckpt_dir)
  for f in _weight_files(ckpt_dir):
    if f.suffix == ".safetensors":
      from safetensors import safe_open  # pylint: disable=g-import-not-at-top
      try:
        with safe_open(str(f), framework="np") as sf:
          for name in sf.keys():
            yield name, sf.get_tensor(name)
      except Exception as e:  # safetensors raises its own error types
        if isinstance(e, CheckpointError):
          raise
        raise CheckpointError(f"{f}: cannot read safetensors file: {e}") from e
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
