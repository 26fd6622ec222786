"""Device mesh, logical-axis rules, and shardings for the train state and batches.

The mesh has three named axes:
  data    pure data parallelism (params replicated across it)
  fsdp    data parallelism with params and optimizer state sharded across it
  tensor  tensor (model) parallelism inside a layer

Params carry logical axis names (``embed``, ``mlp``, ``heads``, ...) through
``nn.with_logical_partitioning``; one rules table (``config.mesh.rules``) maps each
logical name to a mesh axis, a tuple of mesh axes, or None (replicated). A batch is
split along its first dimension over ``('data', 'fsdp')``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from kptjax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


def mesh_shape(shape: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
  """Resolves ``{'data': -1, 'fsdp': 2, 'tensor': 1}`` to sizes whose product is num_devices.

  At most one axis may be -1; it takes the devices the others leave.
  """
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  unknown = [i for i, s in enumerate(sizes) if s == -1]
  if len(unknown) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f"mesh.shape {dict(shape)}: sizes must be positive, at most one -1")
  known = math.prod(s for s in sizes if s != -1)
  if unknown:
    if num_devices % known:
      raise ConfigError(f"mesh.shape {dict(shape)}: {num_devices} devices are not "
                        f"divisible by {known}")
    sizes[unknown[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(f"mesh.shape {dict(shape)} has {math.prod(sizes)} devices, "
                      f"but {num_devices} are available")
  return tuple(sizes)


def make_mesh(mesh_config: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A ('data', 'fsdp', 'tensor') mesh with Auto axes over ``devices`` (default: all)."""
  devices = list(devices) if devices is not None else jax.devices()
  sizes = mesh_shape(mesh_config.shape, len(devices))
  return jax.make_mesh(sizes, MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def logical_rules(mesh_config: ml_collections.ConfigDict) -> Rules:
  """``config.mesh.rules`` (lists, as ConfigDicts store them) as a tuple of pairs."""
  rules = []
  for name, axes in mesh_config.rules:
    if isinstance(axes, (list, tuple)):
      axes = tuple(axes)
      bad = [a for a in axes if a not in MESH_AXES]
    else:
      bad = [axes] if axes is not None and axes not in MESH_AXES else []
    if bad:
      raise ConfigError(f"mesh.rules: logical axis '{name}' maps to unknown mesh "
                        f"axes {bad}; expected a subset of {MESH_AXES}")
    rules.append((name, axes))
  return tuple(rules)


def _axis_size(mesh: jax.sharding.Mesh, axes: Any) -> int:
  if axes is None:
    return 1
  axes = axes if isinstance(axes, tuple) else (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def fit_spec(spec: P, shape: Sequence[int], mesh: jax.sharding.Mesh) -> P:
  """Drops the mesh axes of every dimension that they do not divide evenly.

  A tiny model on a big mesh (e.g. 2 kv heads on a tensor axis of 4) is then
  replicated along that dimension instead of failing to compile.
  """
  entries = list(spec) + [None] * (len(shape) - len(spec))
  return P(*[axes if dim % _axis_size(mesh, axes) == 0 else None
             for axes, dim in zip(entries, shape)])


def logical_to_mesh_spec(names: Sequence[str | None] | None, rules: Rules) -> P:
  """Logical axis names of one array -> its mesh PartitionSpec.

  Rules are applied in table order (as ``flax.linen.logical_to_mesh_axes`` does): a rule
  assigns its mesh axes to the first dimension with that logical name if none of those
  mesh axes is used by the array yet. Unknown names stay replicated; a name that occurs
  twice (e.g. ``('patch', 'patch', None, 'vit_embed')``) is mapped at its first dimension
  only, where ``flax.linen.logical_to_mesh_axes`` raises.
  """
  if names is None:
    return P()
  out: list[Any] = [None] * len(names)
  used: set[str] = set()
  for name, axes in rules:
    if axes is None or name not in names:
      continue
    pos = list(names).index(name)
    mesh_axes = axes if isinstance(axes, tuple) else (axes,)
    if out[pos] is None and not used.intersection(mesh_axes):
      out[pos] = axes
      used.update(mesh_axes)
  return P(*out)


def logical_shardings(boxed_tree: Any, mesh: jax.sharding.Mesh, rules: Rules) -> Any:
  """NamedShardings for a tree of (possibly ``nn.LogicallyPartitioned``) arrays/shapes.

  Args:
    boxed_tree: e.g. ``jax.eval_shape(model.init, ...)['params']``; leaves without
      logical names are replicated.
    mesh: the device mesh.
    rules: logical axis name -> mesh axes.

  Returns:
    A tree shaped like ``nn.unbox(boxed_tree)`` of NamedSharding.
  """
  def one(leaf):
    names = leaf.names if isinstance(leaf, nn.LogicallyPartitioned) else None
    x = nn.unbox(leaf)
    spec = logical_to_mesh_spec(names, rules)
    fitted = fit_spec(spec, x.shape, mesh)
    if names is not None and fitted != spec:
      logging.log_first_n(logging.INFO, "Replicating dims of %s%s not divisible by %s",
                          20, x.dtype, x.shape, spec)
    return NamedSharding(mesh, fitted)

  return jax.tree.map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) dimension over ('data', 'fsdp'), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
  return _axis_size(mesh, BATCH_AXES)


def shard_batch(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """This process's slice of the global batch -> global jax.Arrays split over the batch axes.

  Args:
    batch: numpy arrays with leading dimension B_local = B_global / process_count.
    mesh: the device mesh.

  Returns:
    Global arrays with leading dimension B_global, sharded like ``batch_sharding(mesh)``.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def describe(mesh: jax.sharding.Mesh) -> str:
  """'data=2 fsdp=2 tensor=2 over 8 devices (cpu), 1 process(es)'."""
  axes = " ".join(f"{k}={v}" for k, v in mesh.shape.items())
  platform = mesh.devices.flat[0].platform
  return (f"{axes} over {mesh.devices.size} devices ({platform}), "
          f"{jax.process_count()} process(es)")
