"""kptjax.xla_cpu: the CPU flags are added before jax starts, and never over a user's own."""

import os
import subprocess
import sys

import jax

from kptjax import xla_cpu

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
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  code = ("import os; from kptjax import xla_cpu; xla_cpu.configure(devices=2); import jax; "
          "print(jax.device_count(), os.environ['XLA_FLAGS'])")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True, cwd=os.path.dirname(os.path.dirname(__file__))).stdout
  assert out.split() == ["2", f"{YNN}=", "--xla_force_host_platform_device_count=2"]
