"""data.read_thread_priority: a read thread lowers itself to SCHED_IDLE the first time it
computes an element, the main thread never does, the values are unchanged, and a value
that is not a priority is a ConfigError naming the field."""

import concurrent.futures
import os

import ml_collections
import pytest

from kptjax.data import thread_priority
from kptjax.errors import ConfigError

linux_only = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")


def _policy_and_value(x):
  return os.sched_getscheduler(0), x * 2


@linux_only
def test_a_read_thread_runs_at_idle_and_the_values_are_the_same():
  wrapped = thread_priority.AtPriority(_policy_and_value, "idle")
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    before = pool.submit(os.sched_getscheduler, 0).result()
    results = [pool.submit(wrapped, x).result() for x in range(3)]
  assert before == os.SCHED_OTHER
  assert results == [(os.SCHED_IDLE, 0), (os.SCHED_IDLE, 2), (os.SCHED_IDLE, 4)]


@linux_only
def test_the_main_thread_keeps_its_priority():
  assert thread_priority.AtPriority(_policy_and_value, "idle")(5) == (os.sched_getscheduler(0), 10)
  assert os.sched_getscheduler(0) != os.SCHED_IDLE
  assert thread_priority.set_this_thread("idle") is False


@linux_only
def test_normal_leaves_the_thread_alone():
  wrapped = thread_priority.AtPriority(_policy_and_value, "normal")
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    assert pool.submit(wrapped, 1).result() == (os.SCHED_OTHER, 2)


def test_a_refused_priority_is_logged_once_and_the_values_are_the_same(monkeypatch, caplog):
  def refuse(*_):
    raise PermissionError("not allowed")
  monkeypatch.setattr(os, "sched_setscheduler", refuse, raising=False)
  monkeypatch.setattr(thread_priority, "_warned", type(thread_priority._warned)())
  wrapped = thread_priority.AtPriority(lambda x: x + 1, "idle")
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    assert list(pool.map(wrapped, range(6))) == [1, 2, 3, 4, 5, 6]
  warnings = [r for r in caplog.records if "read_thread_priority" in r.getMessage()]
  assert len(warnings) == 1 and "not allowed" in warnings[0].getMessage()


@pytest.mark.parametrize("value", ["low", "", None, 19])
def test_a_value_that_is_not_a_priority_names_the_field(value):
  config = ml_collections.ConfigDict({"data": {"read_thread_priority": value}})
  with pytest.raises(ConfigError, match=r"data\.read_thread_priority=.*normal, idle"):
    thread_priority.from_config(config)


def test_an_absent_field_is_normal():
  assert thread_priority.from_config(ml_collections.ConfigDict({"data": {}})) == "normal"
