"""kptjax.xla_cpu: the CPU flags are added before jax starts, and never over a user's own."""

import os
import subprocess
import sys

import jax
import pytest

from kptjax import xla_cpu
from kptjax.errors import ConfigError

YNN = "--xla_cpu_experimental_ynn_fusion_type"


def test_defaults_are_added_once():
  assert xla_cpu.flags_with_defaults("") == f"{YNN}="
  assert xla_cpu.flags_with_defaults("", devices=2) == (
      f"{YNN}= --xla_force_host_platform_device_count=2")
  once = xla_cpu.flags_with_defaults("", devices=2)
  assert xla_cpu.flags_with_defaults(once, devices=2) == once
  assert xla_cpu.flags_with_defaults("", devices=1) == f"{YNN}="


def test_user_flags_win():
  mine = f"--xla_force_host_platform_device_count=8 {YNN}=dot"
  assert xla_cpu.flags_with_defaults(mine, devices=2) == mine
  assert xla_cpu.flags_with_defaults("--xla_dump_to=/tmp/x") == f"--xla_dump_to=/tmp/x {YNN}="


def test_configure_after_start_changes_nothing():
  jax.devices()   # the backends are running in this process
  env = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
  xla_cpu.configure(devices=2, env=env)
  assert env == {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}


def test_configure_before_start_takes_effect():
  code = ("import os; from kptjax import xla_cpu; xla_cpu.configure(devices=2); import jax; "
          "print(jax.device_count(), os.environ['XLA_FLAGS'])")
  assert _fresh_process(code) == ["2", f"{YNN}=", "--xla_force_host_platform_device_count=2"]


def _fresh_process(code: str, *args: str, **env_extra: str) -> list[str]:
  """The words ``python -c code args`` prints, run from the repository root without the
  caller's XLA_FLAGS."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | env_extra
  return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                        text=True, check=True,
                        cwd=os.path.dirname(os.path.dirname(__file__))).stdout.split()


def test_host_device_count_reads_the_last_count_flag():
  assert xla_cpu.host_device_count("") == 1
  assert xla_cpu.host_device_count(f"{YNN}= --xla_force_host_platform_device_count=4") == 4
  assert xla_cpu.host_device_count("--xla_force_host_platform_device_count=2 "
                                   "--xla_force_host_platform_device_count=8") == 8
  with pytest.raises(ConfigError, match="xla_force_host_platform_device_count='two'"):
    xla_cpu.host_device_count("--xla_force_host_platform_device_count=two")


def test_cpu_only_host_follows_jax_platforms():
  assert xla_cpu.cpu_only_host({"JAX_PLATFORMS": "cpu"})
  assert not xla_cpu.cpu_only_host({"JAX_PLATFORMS": "cuda"})
  assert not xla_cpu.cpu_only_host({"JAX_PLATFORMS": "tpu,cpu"})


# In a fresh process: configure(), then a 256 MiB malloc block is written, freed and
# written again; prints the async-dispatch setting and the page faults of the second write.
_REUSE = """
import ctypes, resource, sys
from kptjax import xla_cpu
xla_cpu.configure(devices=int(sys.argv[1]), reuse_memory=sys.argv[2] == "1")
import jax
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
size = 1 << 28
block = libc.malloc(size); ctypes.memset(block, 1, size); libc.free(block)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = libc.malloc(size); ctypes.memset(block, 1, size)
print(jax.config.read("jax_cpu_enable_async_dispatch"),
      resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _reuse_run(devices: int, reuse: bool) -> tuple[str, int]:
  out = _fresh_process(_REUSE, str(devices), str(int(reuse)), JAX_PLATFORMS="cpu")
  return out[0], int(out[1])


def test_configure_keeps_freed_memory_and_dispatches_one_device_in_line():
  dispatch, faults = _reuse_run(devices=1, reuse=True)
  assert dispatch == "False"
  assert faults < 1000                      # 256 MiB is 65,536 pages of 4 KiB
  dispatch, faults = _reuse_run(devices=2, reuse=False)
  assert dispatch == "True"                 # several devices: XLA's worker threads
  if not _huge_pages_always():              # 4 KiB pages: the fault count can tell
    assert faults > 30000                   # malloc's default maps the block afresh


def _huge_pages_always() -> bool:
  """Whether the kernel backs every large anonymous mapping with 2 MiB pages."""
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return "[always]" in f.read()
  except OSError:
    return False
