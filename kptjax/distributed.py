"""Starting the processes of a multi-host run, and splitting work across them.

One process runs per host (a TPU VM worker, a GPU node) or per GPU; every process calls
:func:`initialize` before JAX touches a device. Where its setup comes from, first match:

1. explicit flags ``--coordinator_address HOST:PORT --num_processes N --process_id I``
   (``launch/local.py`` passes them; any cluster where you know the three numbers);
2. ``--multihost`` under SLURM (``SLURM_JOB_ID``, ``SLURM_PROCID``, ... set by ``srun``):
   the coordinator is the first host of ``$SLURM_JOB_NODELIST`` (port:
   ``$KPTJAX_COORDINATOR_PORT``, else derived from the job id as JAX does), the process id
   ``$SLURM_PROCID``, the count ``$SLURM_NTASKS``;
3. ``--multihost`` elsewhere: ``jax.distributed.initialize()`` detects the rest itself
   (Cloud TPU VMs and pod slices, Open MPI, Kubernetes jobs).

Local GPUs under SLURM (:func:`slurm_local_device_ids`): JAX's own SLURM detection gives
every process the single GPU ``$SLURM_LOCALID``, which is right for one process per GPU
and wrong for one process per node (each node then trains on one of its GPUs: the
MaxText report). Whenever SLURM is present this module passes ``local_device_ids``
itself: all the node's GPUs for one task per node, the task's own GPU otherwise.

On CPU (the tests, ``launch/local.py --devices_per_process``) cross-process collectives
need an implementation; gloo is chosen when none is configured.

Data-parallel work outside the train step (evaluation): :func:`split_for_process` gives
each process a contiguous block of the items, the same size on every process (the tail
padded) so that all of them run the same number of collective steps;
:func:`gather_to_process0` collects each process's JSON-able results, in item order, on
process 0 (which alone writes files).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import flags, logging
from jax.experimental import multihost_utils

from kptjax.errors import ConfigError

PORT_ENV = "KPTJAX_COORDINATOR_PORT"
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


@dataclasses.dataclass(frozen=True)
class ProcessSetup:
  """The arguments of ``jax.distributed.initialize``; None = let JAX detect it.

  Attributes:
    coordinator_address: 'HOST:PORT' of process 0's coordination service.
    num_processes: how many processes the run has.
    process_id: this process's index, 0-based.
    local_device_ids: the local accelerators this process uses (GPU ordinals).
    source: where the numbers came from: 'flags', 'slurm' or 'jax' (JAX's detection).
  """
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None
  source: str = "jax"


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The process start-up flags of the mains (``kptjax.train``)."""
  flags.DEFINE_bool("multihost", False, "Start a multi-process run: the setup comes from "
                    "the flags below, else from SLURM, else from JAX's detection (TPU VMs).",
                    flag_values=flag_values)
  flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (implies "
                      "--multihost; with --num_processes and --process_id).",
                      flag_values=flag_values)
  flags.DEFINE_integer("num_processes", None, "Number of processes of the run.",
                       flag_values=flag_values)
  flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).",
                       flag_values=flag_values)
  flags.DEFINE_list("local_device_ids", None, "GPU ordinals this process uses, e.g. "
                    "0,1,2,3 (default: all visible; under SLURM see kptjax.distributed).",
                    flag_values=flag_values)


def setup_from_flags(flag_values: flags.FlagValues = flags.FLAGS,
                     env: Mapping[str, str] = os.environ) -> ProcessSetup | None:
  """The flags of ``define_flags`` (and the environment) -> a setup; None = one process."""
  ids = flag_values.local_device_ids
  return make_setup(multihost=flag_values.multihost,
                    coordinator_address=flag_values.coordinator_address,
                    num_processes=flag_values.num_processes,
                    process_id=flag_values.process_id,
                    local_device_ids=None if ids is None else tuple(int(i) for i in ids),
                    env=env)


def make_setup(*, multihost: bool = False, coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               local_device_ids: Sequence[int] | None = None,
               env: Mapping[str, str] = os.environ) -> ProcessSetup | None:
  """Resolves the setup (module docstring, in its order); None = a single-process run.

  Raises:
    ConfigError: explicit values that are incomplete or inconsistent.
  """
  explicit = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id)
  given = {k for k, v in explicit.items() if v is not None}
  if not given and not multihost:
    return None
  ids = None if local_device_ids is None else tuple(local_device_ids)
  in_slurm = all(v in env for v in _SLURM_VARS)
  if given:
    missing = sorted(set(explicit) - given)
    if missing:
      raise ConfigError(f"process start-up: {sorted(given)} given without {missing}; "
                        "pass all three (or only --multihost to detect them)")
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ConfigError(f"process start-up: --process_id={process_id} is not in "
                        f"[0, --num_processes={num_processes})")
    if ":" not in coordinator_address:
      raise ConfigError(f"--coordinator_address={coordinator_address!r}: expected HOST:PORT")
    if ids is None and in_slurm:   # else JAX's SLURM detection would narrow it to one GPU
      ids = slurm_local_device_ids(env)
    return ProcessSetup(coordinator_address, num_processes, process_id, ids, "flags")
  if in_slurm:
    return slurm_setup(env, ids)
  return ProcessSetup(local_device_ids=ids, source="jax")


def first_host(nodelist: str) -> str:
  """The first host of a SLURM node list: 'gpu[003-010,017],cpu1' -> 'gpu003'.

  Raises:
    ConfigError: an empty or malformed list.
  """
  m = re.match(r"\s*([^,\[\s]+)(?:\[([^\]]*)\])?", nodelist)
  if not m or (m.group(2) is not None and not m.group(2).strip()):
    raise ConfigError(f"SLURM_JOB_NODELIST={nodelist!r}: no host name in it")
  prefix, ranges = m.group(1), m.group(2)
  if ranges is None:
    return prefix
  return prefix + re.split(r"[,-]", ranges.strip())[0]


def slurm_setup(env: Mapping[str, str] = os.environ,
                local_device_ids: Sequence[int] | None = None) -> ProcessSetup:
  """The setup of this SLURM task (``srun``): coordinator, id and count from the
  environment (module docstring), local GPUs from :func:`slurm_local_device_ids`."""
  nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_STEP_NODELIST") or ""
  port = env.get(PORT_ENV) or str(int(env["SLURM_JOB_ID"]) % 4096 + 61440)
  ids = tuple(local_device_ids) if local_device_ids is not None else slurm_local_device_ids(env)
  return ProcessSetup(coordinator_address=f"{first_host(nodelist)}:{port}",
                      num_processes=int(env["SLURM_NTASKS"]),
                      process_id=int(env["SLURM_PROCID"]), local_device_ids=ids,
                      source="slurm")


def _tasks_per_node(env: Mapping[str, str]) -> int:
  """Tasks on this node: ``SLURM_NTASKS_PER_NODE``, else the first count of
  ``SLURM_TASKS_PER_NODE`` ('8(x2),4' -> 8), else all tasks on one node."""
  if env.get("SLURM_NTASKS_PER_NODE"):
    return int(env["SLURM_NTASKS_PER_NODE"])
  m = re.match(r"\s*(\d+)", env.get("SLURM_TASKS_PER_NODE", ""))
  return int(m.group(1)) if m else int(env["SLURM_NTASKS"])


def slurm_local_device_ids(env: Mapping[str, str] = os.environ) -> tuple[int, ...]:
  """The GPU ordinals (as this process sees them) a SLURM task uses.

  One task per node: every GPU the node gives it (``CUDA_VISIBLE_DEVICES``, else
  ``SLURM_GPUS_ON_NODE``). Several tasks per node: ``(0,)`` when SLURM bound one GPU to
  the task (``--gpus-per-task=1``: ``CUDA_VISIBLE_DEVICES`` lists one), else the task's
  own ``(SLURM_LOCALID,)``.

  Raises:
    ConfigError: one task per node and nothing says how many GPUs it has.
  """
  visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
  if _tasks_per_node(env) == 1:
    count = len(visible) or int(env.get("SLURM_GPUS_ON_NODE") or 0)
    if not count:
      raise ConfigError("SLURM, one task per node: neither CUDA_VISIBLE_DEVICES nor "
                        "SLURM_GPUS_ON_NODE says how many GPUs it has; pass "
                        "--local_device_ids=0,1,... (JAX alone would use GPU 0 only)")
    return tuple(range(count))
  if len(visible) == 1:
    return (0,)
  return (int(env["SLURM_LOCALID"]),)


def initialize(setup: ProcessSetup | None) -> None:
  """Starts this process's part of a multi-process run (nothing for None).

  Call before anything touches a device. Uses gloo for CPU collectives when no
  implementation is configured.
  """
  if setup is None:
    return
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = dict(coordinator_address=setup.coordinator_address,
                num_processes=setup.num_processes, process_id=setup.process_id,
                local_device_ids=None if setup.local_device_ids is None
                else list(setup.local_device_ids))
  logging.info("jax.distributed.initialize (%s): %s", setup.source,
               {k: v for k, v in kwargs.items() if v is not None} or "detected by JAX")
  jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None})
  logging.info("Process %d of %d: %d local devices of %d (%s)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)


@dataclasses.dataclass(frozen=True)
class ProcessSlice:
  """This process's block of ``n`` items: ``items[start:stop]``, padded to ``size`` rows
  (the same ``size`` on every process)."""
  start: int
  stop: int
  size: int

  @property
  def count(self) -> int:
    return self.stop - self.start


def split_for_process(n: int, process_index: int | None = None,
                      process_count: int | None = None) -> ProcessSlice:
  """Contiguous blocks of ``ceil(n / process_count)`` items, process 0 first.

  Args:
    n: number of items (persons, images).
    process_index, process_count: default: this run's.
  """
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ConfigError(f"process_index={index} is not in [0, {count})")
  size = -(-n // count)
  start = min(index * size, n)
  return ProcessSlice(start=start, stop=min(start + size, n), size=size)


def gather_to_process0(local: Sequence[Any]) -> list[Any] | None:
  """Every process's ``local`` list concatenated in process order, on process 0.

  With ``split_for_process`` blocks that is the item order of a single-process run. The
  items must be JSON values (numbers, strings, lists, dicts): they cross processes as
  JSON, so floats come back bit-exact (``repr``) and tuples as lists. Every process
  must call it (it is a collective).

  Returns:
    The concatenated list on process 0, None on the others.
  """
  blob = np.frombuffer(json.dumps(list(local)).encode("utf-8"), np.uint8)
  if jax.process_count() == 1:
    return json.loads(blob.tobytes())
  sizes = np.asarray(multihost_utils.process_allgather(np.int64(blob.size))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:blob.size] = blob
  blobs = np.asarray(multihost_utils.process_allgather(padded))   # [processes, max bytes]
  if jax.process_index() != 0:
    return None
  out: list[Any] = []
  for row, size in zip(blobs, sizes):
    out.extend(json.loads(row[:size].tobytes()))
  return out
