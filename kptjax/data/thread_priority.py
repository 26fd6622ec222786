"""The input pipeline's read threads at a low CPU priority (``data.read_thread_priority``).

On a host whose cores the train step itself uses (the CPU demo: 2 cores, 2 XLA devices),
grain's read threads compete with XLA's worker threads for the cores. At ``'idle'``
(Linux ``SCHED_IDLE``) a read thread runs only on a core that would otherwise idle, and the
step's threads wait on each other at the gradient all-reduce often enough that decoding
and cropping fit in those gaps instead of delaying the step. The elements are the same;
only when they are computed changes. ``'normal'`` (the default) leaves the threads alone:
on an accelerator host the step does not run on the host's cores.

The priority is set by the read thread itself, the first time it computes an element
(:class:`AtPriority` wraps the element transform), never on the main thread (which
dispatches the steps) and once per thread. A platform without ``SCHED_IDLE`` or a refusal
by the OS is logged once and the thread keeps its priority.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable

from absl import logging

from kptjax.errors import ConfigError

PRIORITIES = ("normal", "idle")
FIELD = "data.read_thread_priority"

_thread_state = threading.local()
_warned = threading.Event()


def check_priority(value: Any) -> str:
  """``value`` if it is one of PRIORITIES, else a ConfigError naming the field."""
  if value not in PRIORITIES:
    raise ConfigError(f"{FIELD}={value!r}: expected one of {', '.join(PRIORITIES)}")
  return value


def from_config(config: Any) -> str:
  """``config.data.read_thread_priority`` checked ('normal' where the field is absent)."""
  return check_priority(config.data.get("read_thread_priority", "normal"))


def set_this_thread(priority: str) -> bool:
  """Gives the calling thread ``priority`` (once per thread; never the main thread).

  Returns:
    whether the thread now runs at ``priority`` ('normal' is always True).
  """
  if priority == "normal":
    return True
  took = getattr(_thread_state, "took", None)   # tried before: whether it took
  if took is not None:
    return took
  if threading.current_thread() is threading.main_thread():
    return False
  try:
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))   # 0: this thread
    ok = True
  except (AttributeError, OSError) as e:   # no SCHED_IDLE here, or refused
    ok = False
    if not _warned.is_set():
      _warned.set()
      logging.warning("%s=%r: the read threads keep their priority (%s)", FIELD, priority,
                      e)
  _thread_state.took = ok   # tried once per thread, whatever the outcome
  return ok


class AtPriority:
  """``transform`` run by a thread set to ``priority`` first (module docstring).
  Picklable for grain workers (it holds no thread state itself)."""

  def __init__(self, transform: Callable[..., Any], priority: str):
    self.transform = transform
    self.priority = check_priority(priority)

  def __call__(self, *args: Any) -> Any:
    set_this_thread(self.priority)
    return self.transform(*args)
