#!/usr/bin/env python3
r"""Runs N processes of one multi-process JAX program on this machine.

    python launch/local.py --num_processes 2 --devices_per_process 4 -- \
        python -m kptjax.train --config configs/tiny.py --workdir /tmp/run

Each copy of the command gets ``--coordinator_address=localhost:PORT
--num_processes=N --process_id=I`` appended (``kptjax.distributed`` reads them; PORT
is a free port unless ``--port``). ``--devices_per_process D`` runs on CPU with D
simulated devices per process (``JAX_PLATFORMS=cpu``,
``XLA_FLAGS=--xla_force_host_platform_device_count=D``): what the tests use. Without it
the processes see this machine's accelerators, split with ``--gpus_per_process``.

When one process fails or is killed, the others are stopped at once (a peer of a dead
process would wait in its next collective until JAX's heartbeat timeout); the exit
status is then the first failure's (a signal N gives 128 + N). After ``--timeout``
seconds all are killed and the status is 124. ``--log_dir`` writes each process's
output to ``process_I.log`` there instead of this terminal.

Standard library only: it starts before, and without, JAX.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

TIMEOUT_STATUS = 124


def free_port() -> int:
  """A TCP port nobody listens on now (the OS picks it)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def process_env(base: dict[str, str], index: int, devices_per_process: int,
                gpus_per_process: int) -> dict[str, str]:
  """The environment of process ``index``: simulated CPU devices or its own GPUs."""
  env = dict(base)
  if devices_per_process:
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [
        f"--xla_force_host_platform_device_count={devices_per_process}"])
    env["JAX_PLATFORMS"] = "cpu"
  elif gpus_per_process:
    first = index * gpus_per_process
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + i) for i in range(gpus_per_process))
  return env


def _status(code: int) -> int:
  return 128 - code if code < 0 else code


def _stop(procs: list[subprocess.Popen], grace: float = 5.0) -> None:
  """SIGTERM to the processes still running, SIGKILL to those alive after ``grace`` s."""
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGTERM)
  deadline = time.monotonic() + grace
  for p in procs:
    try:
      p.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def launch(command: list[str], num_processes: int, *, port: int = 0,
           devices_per_process: int = 0, gpus_per_process: int = 0,
           timeout: float | None = None, log_dir: str | None = None) -> int:
  """Runs ``num_processes`` copies of ``command``; returns the exit status (module doc)."""
  if not command:
    raise SystemExit("launch/local.py: no command given (put it after --)")
  port = port or free_port()
  logs = []
  if log_dir:
    pathlib.Path(log_dir).mkdir(parents=True, exist_ok=True)
  procs: list[subprocess.Popen] = []
  try:
    for i in range(num_processes):
      cmd = command + [f"--coordinator_address=localhost:{port}",
                       f"--num_processes={num_processes}", f"--process_id={i}"]
      out = None
      if log_dir:
        out = open(pathlib.Path(log_dir) / f"process_{i}.log", "w")  # pylint: disable=consider-using-with
        logs.append(out)
      procs.append(subprocess.Popen(
          cmd, env=process_env(dict(os.environ), i, devices_per_process, gpus_per_process),
          stdout=out, stderr=subprocess.STDOUT if out else None))
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
      codes = [p.poll() for p in procs]
      failed = [c for c in codes if c not in (None, 0)]
      if failed:
        _stop(procs)
        return _status(failed[0])
      if all(c == 0 for c in codes):
        return 0
      if deadline is not None and time.monotonic() > deadline:
        _stop(procs, grace=0.0)
        return TIMEOUT_STATUS
      time.sleep(0.2)
  finally:
    _stop(procs)
    for f in logs:
      f.close()


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  split = argv.index("--") if "--" in argv else len(argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_processes", "-n", type=int, required=True)
  parser.add_argument("--port", type=int, default=0, help="coordinator port (0 = a free one)")
  parser.add_argument("--devices_per_process", type=int, default=0,
                      help="simulated CPU devices per process (0 = real accelerators)")
  parser.add_argument("--gpus_per_process", type=int, default=0,
                      help="give process I the GPUs I*G .. I*G+G-1 (CUDA_VISIBLE_DEVICES)")
  parser.add_argument("--timeout", type=float, default=None, help="seconds before all are killed")
  parser.add_argument("--log_dir", default=None, help="write process_I.log files here")
  args = parser.parse_args(argv[:split])
  return launch(argv[split + 1:], args.num_processes, port=args.port,
                devices_per_process=args.devices_per_process,
                gpus_per_process=args.gpus_per_process, timeout=args.timeout,
                log_dir=args.log_dir)


if __name__ == "__main__":
  sys.exit(main())
