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
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

from absl import logging

CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def flags_with_defaults(xla_flags: str, devices: int | None = None,
                        cpu_flags: tuple[str, ...] = CPU_FLAGS) -> str:
  """``xla_flags`` plus each of ``cpu_flags`` (and the device count) it does not name."""
  named = {flag.split("=", 1)[0] for flag in xla_flags.split()}
  extra = [flag for flag in cpu_flags if flag.split("=", 1)[0] not in named]
  if devices is not None and devices > 1 and DEVICE_COUNT_FLAG not in named:
    extra.append(f"{DEVICE_COUNT_FLAG}={devices}")
  return " ".join([xla_flags.strip()] + extra).strip()


def configure(devices: int | None = None,
              env: MutableMapping[str, str] = os.environ) -> None:
  """Adds kptjax's CPU defaults to ``env['XLA_FLAGS']`` (see the module docstring).

  Args:
    devices: simulated CPU devices to split the host into (None or 1: XLA's one device).
    env: the environment to edit (``os.environ``; processes started later inherit it).
  """
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  flags = flags_with_defaults(env.get("XLA_FLAGS", ""), devices)
  if flags == env.get("XLA_FLAGS", ""):
    return
  if xla_bridge.backends_are_initialized():
    logging.warning("xla_cpu.configure: JAX's backends already started; XLA_FLAGS %r "
                    "not applied", flags)
    return
  env["XLA_FLAGS"] = flags
