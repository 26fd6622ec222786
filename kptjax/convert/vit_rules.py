"""Tensor-name rules shared by the ViT converters (``dinov2``, ``clip``).

A ``Rule`` maps one Hugging Face tensor to one kptjax param: (param path, kptjax array
from the HF array, HF shape from the kptjax shape). ``place_tensor`` checks and stores a
tensor by its rule; ``param_shapes`` is the ViT's param shapes from its config alone.
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kptjax.errors import CheckpointError
from kptjax.models.vit import ViT

def square_side(value: Any, what: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise CheckpointError(f"config.json: {what}={value}: only square sizes are supported")
    value = value[0]
  return int(value)


# ------------------------------------------------------------------ tensor name table
# A rule: (param path, kptjax array from HF array, HF shape from the kptjax shape).
Rule = tuple[tuple[str, ...], Callable[[np.ndarray], np.ndarray], Callable[[tuple], tuple]]


def same() -> tuple[Callable, Callable]:
  return (lambda w: w), (lambda s: s)


def linear() -> tuple[Callable, Callable]:
  return (lambda w: w.T), (lambda s: s[::-1])


def squeeze_leading(n: int) -> tuple[Callable, Callable]:
  return (lambda w: w.reshape(w.shape[n:]) if w.shape[:n] == (1,) * n else w,
          lambda s: (1,) * n + s)


def conv_shape(kernel_shape: tuple) -> tuple:
  """HF conv weight [D, 3, p, p] for our patch kernel [p*p*3, D] (3 channels)."""
  k, d = kernel_shape
  p = int(round((k // 3) ** 0.5))
  return (d, 3, p, p)


def param_shapes(config: ml_collections.ConfigDict) -> dict:
  p = config.patch_size
  shapes = jax.eval_shape(lambda: ViT(config).init(jax.random.key(0),
                                                   jnp.zeros((1, p, p, 3), jnp.float32)))
  return jax.tree_util.tree_map(lambda x: x.shape, nn.meta.unbox(shapes["params"]))


def flatten_paths(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten_paths(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def unflatten_paths(flat: dict[tuple[str, ...], Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


def place_tensor(arrays: dict, filled: dict, expected: dict, path: tuple[str, ...],
                 layer: int | None, tensor: np.ndarray, rule: tuple[Callable, Callable],
                 target_dtype: Any, what: str) -> None:
  """Checks one Hugging Face tensor's shape, converts it and stores it at ``path``.

  Args:
    arrays: flat kptjax params being filled ({path: array}); a scanned param
      (``layer`` not None) is allocated once as ``expected[path]`` (layers first).
    filled: {path: set of layers stored}, for the missing-tensor check.
    expected: {path: kptjax shape} of the model built from config.json.
    rule: (convert: HF tensor -> kptjax value, hf_shape: kptjax shape -> HF shape).
    what: the tensor in messages, e.g. ``"DIR: tensor 'encoder.layer.0.norm1.weight'"``.

  Raises:
    CheckpointError: the tensor's shape is not the one config.json implies.
  """
  convert, hf_shape = rule
  want = expected[path][1:] if layer is not None else expected[path]
  if tuple(tensor.shape) != hf_shape(tuple(want)):
    raise CheckpointError(f"{what} has shape {tuple(tensor.shape)}, expected "
                          f"{hf_shape(tuple(want))} (from config.json)")
  value = convert(tensor)
  if layer is None:
    arrays[path] = np.asarray(value, dtype=target_dtype or value.dtype)
    return
  if path not in arrays:
    arrays[path] = np.empty(expected[path], target_dtype or value.dtype)
  arrays[path][layer] = value
  filled.setdefault(path, set()).add(layer)


def raise_if_dropped(ckpt_dir: pathlib.Path, dropped: list[str]) -> None:
  """CheckpointError listing the tensors a ViT loader found no place for, if any."""
  if dropped:
    raise CheckpointError(
        f"{ckpt_dir}: {len(dropped)} tensors have no place in the ViT its config.json "
        f"describes and would be dropped: {', '.join(dropped[:6])}"
        + (" ..." if len(dropped) > 6 else ""))
