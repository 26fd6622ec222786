"""XLA's settings for kptjax's jobs on a CPU host, set before JAX starts its backends.

XLA reads ``$XLA_FLAGS`` once, when the first device is touched, so :func:`configure`
must run before that (the mains call it first thing; ``tests/conftest.py`` before it
imports jax). It only adds flags the environment does not already name, so a user's own
``XLA_FLAGS`` always wins. Both flags touch the CPU backend alone: on a GPU or TPU host
they change nothing the job runs.

* ``--xla_cpu_experimental_ynn_fusion_type=`` (:data:`CPU_FLAGS`): XLA's default in
  jax 0.10 hands dots to YNNPACK fusions; the Eigen dots it falls back to without them ran
  the issue's small-size LoRA train step ~15 % faster and the demo step ~6 % faster on
  this project's 2-core machines (``experiments/bench_train.py``, and ``--xla_default``
  for XLA's own flags; README, "Training memory and speed").
* ``devices=N`` adds ``--xla_force_host_platform_device_count=N``: N CPU devices, so the
  data-parallel mesh runs N shards of the batch side by side. The demo uses 2, one per
  core of a 2-core machine: its small ops are too short to keep both cores busy inside
  one device (README, "What the demo does").

Two process settings go with the flags, on a host with no accelerator plugin installed
(:func:`cpu_only_host`), where a step's buffers are host memory:

* ``reuse_memory`` (:func:`keep_freed_memory`): glibc's malloc serves every block from
  its heap and keeps what is freed for the next request. By default it maps each large
  block afresh and unmaps it when freed, so every step's ~2 GB of temporaries (the
  small-size step with remat off) came back as ~490,000 page faults of zeroed memory:
  ~17 % of the step's CPU time in the kernel. The cost: the process keeps its peak
  memory (RSS does not shrink after a step).
* ``sync_dispatch`` (``jax_cpu_enable_async_dispatch=False``, one device only): the
  calling thread runs the program, so its temporaries come from malloc's main heap
  (which the first setting keeps) rather than from a worker thread's arena, whose large
  blocks glibc always maps afresh. The Python loop waits for each step, which a train
  step's ``block_until_ready`` of its metrics does anyway.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from collections.abc import MutableMapping

from absl import logging

from kptjax.errors import ConfigError

CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def flags_with_defaults(xla_flags: str, devices: int | None = None,
                        cpu_flags: tuple[str, ...] = CPU_FLAGS) -> str:
  """``xla_flags`` plus each of ``cpu_flags`` (and the device count) it does not name."""
  named = {flag.split("=", 1)[0] for flag in xla_flags.split()}
  extra = [flag for flag in cpu_flags if flag.split("=", 1)[0] not in named]
  if devices is not None and devices > 1 and DEVICE_COUNT_FLAG not in named:
    extra.append(f"{DEVICE_COUNT_FLAG}={devices}")
  return " ".join([xla_flags.strip()] + extra).strip()


def host_device_count(xla_flags: str) -> int:
  """The CPU devices ``xla_flags`` asks for (``DEVICE_COUNT_FLAG``; 1 when unnamed)."""
  counts = [flag.split("=", 1)[1] for flag in xla_flags.split()
            if flag.startswith(DEVICE_COUNT_FLAG + "=")]
  if not counts:
    return 1
  if not counts[-1].isdigit():
    raise ConfigError(f"XLA_FLAGS: {DEVICE_COUNT_FLAG}={counts[-1]!r} is not a device count")
  return int(counts[-1])


def cpu_only_host(env: MutableMapping[str, str] = os.environ) -> bool:
  """True when JAX can only run on the CPU here: ``JAX_PLATFORMS=cpu``, or no GPU/TPU
  plugin (``jax_plugins``, ``libtpu``) is installed."""
  platforms = env.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms == "cpu"
  return all(importlib.util.find_spec(name) is None for name in ("jax_plugins", "libtpu"))


def keep_freed_memory() -> bool:
  """Has glibc's malloc serve large blocks from its heap (``M_MMAP_MAX=0``) and never
  hand freed memory back to the OS (``M_TRIM_THRESHOLD`` unlimited): freed buffers are
  reused without page faults. False where the C library has no ``mallopt`` (not glibc)."""
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  no_maps = mallopt(M_MMAP_MAX, 0)
  no_trim = mallopt(M_TRIM_THRESHOLD, -1)
  return bool(no_maps and no_trim)


def configure(devices: int | None = None,
              env: MutableMapping[str, str] = os.environ, *,
              reuse_memory: bool = True, sync_dispatch: bool = True) -> None:
  """Adds kptjax's CPU defaults to ``env['XLA_FLAGS']`` and, on a CPU-only host, the
  process settings (see the module docstring).

  Args:
    devices: simulated CPU devices to split the host into (None or 1: XLA's one device).
    env: the environment to edit (``os.environ``; processes started later inherit it).
    reuse_memory: ``keep_freed_memory`` (CPU-only hosts).
    sync_dispatch: with one device, run programs on the calling thread (CPU-only hosts).
  """
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  flags = flags_with_defaults(env.get("XLA_FLAGS", ""), devices)
  if xla_bridge.backends_are_initialized():
    if flags != env.get("XLA_FLAGS", ""):
      logging.warning("xla_cpu.configure: JAX's backends already started; XLA_FLAGS %r "
                      "not applied", flags)
    return
  env["XLA_FLAGS"] = flags
  if not cpu_only_host(env):
    return
  if reuse_memory:
    keep_freed_memory()
  if sync_dispatch and host_device_count(flags) == 1:
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_cpu_enable_async_dispatch", False)
