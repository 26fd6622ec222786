"""Multi-process runs with real processes on this machine (CPU, gloo collectives).

* training on 2 processes x 4 simulated devices (``launch/local.py`` starting
  ``tests/mp_train_worker.py``, mesh fsdp=4 x tensor=2 across both processes) equals the
  same run in 1 process x 8 devices (this pytest process): every step's loss and
  gradient norm and the final trained params (``adapter.safetensors``) agree to 1e-5;
* one of the 2 processes is SIGKILLed after step 3 (its peer is stopped by the
  launcher); both restarted resume from the step-2 checkpoint and end where the
  uninterrupted run does; only process 0 wrote the shared files (one TensorBoard file
  per launch, one ``metrics.jsonl`` line per step and launch);
* ``distributed.split_for_process`` + ``gather_to_process0`` across the 2 processes
  give the items in single-process order, bit-exact;
* the start-up setup: explicit flags, SLURM environments (one task per node: all its
  GPUs, not JAX's one; one task per GPU), node lists, and the refusals.
"""

import json
import math
import os
import pathlib
import signal
import subprocess
import sys

import jax
import mp_train_worker as worker
import numpy as np
import pytest
from absl import flags

from kptjax import convert, distributed
from kptjax.errors import ConfigError
from kptjax.training import metrics_writer, trainer as trainer_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS, EVERY, KILL_AT = 4, 2, 3
KILLED = 128 + signal.SIGKILL   # the launcher's status when a process died of SIGKILL


def _launch(tmp, name, *args):
  """Starts ``launch/local.py -n 2 --devices_per_process 4`` of the worker (own session)."""
  # The session's compilation cache (conftest, in os.environ): the resumed launch loads
  # the programs the killed one compiled.
  env = dict(os.environ, PYTHONPATH=str(REPO))
  cmd = [sys.executable, str(REPO / "launch" / "local.py"), "-n", "2",
         "--devices_per_process", "4", "--timeout", "500", "--log_dir", str(tmp / name),
         "--", sys.executable, str(REPO / "tests" / "mp_train_worker.py"),
         f"--workdir={tmp / 'run'}", f"--num_steps={STEPS}", f"--checkpoint_every={EVERY}",
         *args]
  return subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True)


def _finish(proc, tmp, name):
  """Waits for a launch (killing its whole process group on the way out)."""
  try:
    rc = proc.wait(timeout=560)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
  logs = {p.name: p.read_text() for p in sorted((tmp / name).glob("*.log"))}
  return rc, logs


def _tails(logs):
  return {name: text[-3000:] for name, text in logs.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("multiprocess")
  killed = _launch(tmp, "killed", f"--kill_at_step={KILL_AT}")
  try:
    # The reference meanwhile, here: 1 process x 8 devices, the same global batches.
    config = worker.config_for_test(STEPS, EVERY)
    trainer_lib.run(config, str(tmp / "reference"), dataset=worker.process_rows(config))
  finally:
    killed_rc, killed_logs = _finish(killed, tmp, "killed")
  killed_rows = metrics_writer.read_metrics(tmp / "run")
  resumed_rc, resumed_logs = _finish(
      _launch(tmp, "resumed", f"--gather_out={tmp / 'gathered.json'}"), tmp, "resumed")
  return dict(tmp=tmp, killed=(killed_rc, killed_logs, killed_rows),
              resumed=(resumed_rc, resumed_logs))


def _by_step(rows, key):
  return {r["step"]: r[key] for r in rows if key in r}


def test_two_processes_killed_and_resumed_equal_one_process(runs):
  tmp = runs["tmp"]
  killed_rc, killed_logs, killed_rows = runs["killed"]
  assert killed_rc == KILLED, _tails(killed_logs)
  resumed_rc, resumed_logs = runs["resumed"]
  assert resumed_rc == 0, _tails(resumed_logs)
  for text in resumed_logs.values():   # both processes restored the step-2 checkpoint
    assert f"Resuming from {tmp / 'run' / 'checkpoints'}/{EVERY}" in text

  # The killed launch logged steps 1..2 or 1..3 (process 0 may or may not have written
  # step 3 before the launcher stopped it); the resumed one 3..4 after the step-2 checkpoint.
  rows = metrics_writer.read_metrics(tmp / "run")
  steps = [r["step"] for r in rows if "loss" in r]
  first = [r["step"] for r in killed_rows if "loss" in r]
  assert first in ([1, 2], [1, 2, 3]), first
  assert steps == first + [3, 4], steps

  reference = metrics_writer.read_metrics(tmp / "reference")
  for key in ("loss", "grad_norm", "accuracy"):
    want = _by_step(reference, key)
    got = _by_step(rows, key)       # the resumed launch's rows come last: they win
    assert sorted(want) == sorted(got) == list(range(1, STEPS + 1))
    for step in want:
      assert got[step] == pytest.approx(want[step], abs=1e-5, rel=1e-5), (key, step)
  assert not math.isclose(_by_step(reference, "loss")[1], _by_step(reference, "loss")[STEPS])

  want, _ = convert.load_params(tmp / "reference" / "adapter.safetensors")
  got, _ = convert.load_params(tmp / "run" / "adapter.safetensors")
  flat_want, flat_got = convert.flatten(want), convert.flatten(got)
  assert flat_want.keys() == flat_got.keys() and len(flat_want) > 4
  for name in flat_want:
    np.testing.assert_allclose(flat_got[name], flat_want[name], atol=1e-5, rtol=1e-5,
                               err_msg=name)

  # Only process 0 writes: one TensorBoard file per launch, the model config once.
  assert len(list((tmp / "run").glob("events.out.tfevents*"))) == 2
  assert json.loads((tmp / "run" / "model_config.json").read_text())["llm"]["hidden_size"] == 32


def test_split_and_gather_across_processes_keep_single_process_order(runs):
  assert runs["resumed"][0] == 0, _tails(runs["resumed"][1])
  got = json.loads((runs["tmp"] / "gathered.json").read_text())
  n = worker.GATHER_ITEMS
  per = -(-n // 2)
  want = [dict(worker.gather_item(i), process=int(i >= per)) for i in range(n)]
  assert got == want


def test_split_for_process_blocks():
  blocks = [distributed.split_for_process(10, i, 4) for i in range(4)]
  assert [(b.start, b.stop, b.size) for b in blocks] == [(0, 3, 3), (3, 6, 3), (6, 9, 3),
                                                          (9, 10, 3)]
  assert [distributed.split_for_process(2, i, 4).count for i in range(4)] == [1, 1, 0, 0]
  with pytest.raises(ConfigError, match="process_index=4"):
    distributed.split_for_process(10, 4, 4)
  assert distributed.gather_to_process0([{"a": 0.1}, [1, 2]]) == [{"a": 0.1}, [1, 2]]


SLURM = dict(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu[003-004,017]", SLURM_NTASKS="3",
             SLURM_PROCID="2", SLURM_LOCALID="0", SLURM_NTASKS_PER_NODE="1",
             CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")


def test_slurm_one_task_per_node_gets_all_its_gpus():
  setup = distributed.make_setup(multihost=True, env=SLURM)
  # JAX's own detection would give local_device_ids=[SLURM_LOCALID] = [0]: one GPU a node.
  assert setup == distributed.ProcessSetup(
      coordinator_address=f"gpu003:{4242 % 4096 + 61440}", num_processes=3, process_id=2,
      local_device_ids=tuple(range(8)), source="slurm")
  no_cuda_env = {k: v for k, v in SLURM.items() if k != "CUDA_VISIBLE_DEVICES"}
  assert distributed.slurm_local_device_ids(
      dict(no_cuda_env, SLURM_GPUS_ON_NODE="4")) == (0, 1, 2, 3)
  with pytest.raises(ConfigError, match="local_device_ids"):
    distributed.slurm_local_device_ids(no_cuda_env)
  port = distributed.make_setup(multihost=True,
                                env=dict(SLURM, KPTJAX_COORDINATOR_PORT="1234"))
  assert port.coordinator_address == "gpu003:1234"


def test_slurm_one_task_per_gpu():
  per_gpu = dict(SLURM, SLURM_NTASKS="16", SLURM_PROCID="13", SLURM_LOCALID="5",
                 SLURM_NTASKS_PER_NODE="8")
  assert distributed.make_setup(multihost=True, env=per_gpu).local_device_ids == (5,)
  bound = dict(per_gpu, CUDA_VISIBLE_DEVICES="5")     # srun --gpus-per-task=1
  assert distributed.make_setup(multihost=True, env=bound).local_device_ids == (0,)
  listed = {k: v for k, v in per_gpu.items() if k != "SLURM_NTASKS_PER_NODE"}
  assert distributed.slurm_local_device_ids(
      dict(listed, SLURM_TASKS_PER_NODE="8(x2)")) == (5,)
  # Explicit flags under SLURM still get the SLURM GPU choice, not JAX's.
  explicit = distributed.make_setup(coordinator_address="h:1", num_processes=16,
                                    process_id=13, env=per_gpu)
  assert explicit.local_device_ids == (5,) and explicit.source == "flags"


@pytest.mark.parametrize("nodelist, host", [
    ("node001", "node001"), ("node001,host2", "node001"), ("node[001-015],host2", "node001"),
    ("node[007,009-015]", "node007"), ("a-b[10-11]", "a-b10"), ("tpu-vm-0", "tpu-vm-0")])
def test_first_host_of_a_slurm_nodelist(nodelist, host):
  assert distributed.first_host(nodelist) == host


def test_setup_from_flags_and_refusals():
  values = flags.FlagValues()
  distributed.define_flags(values)
  values(["prog", "--coordinator_address=localhost:5", "--num_processes=2",
          "--process_id=1", "--local_device_ids=0,1"])
  assert distributed.setup_from_flags(values, env={}) == distributed.ProcessSetup(
      "localhost:5", 2, 1, (0, 1), "flags")
  none = flags.FlagValues()
  distributed.define_flags(none)
  none(["prog"])
  assert distributed.setup_from_flags(none, env={}) is None      # one process
  assert distributed.make_setup(multihost=True, env={}) == distributed.ProcessSetup()
  with pytest.raises(ConfigError, match=r"without \['num_processes', 'process_id'\]"):
    distributed.make_setup(coordinator_address="h:1", env={})
  with pytest.raises(ConfigError, match="process_id=2 is not in"):
    distributed.make_setup(coordinator_address="h:1", num_processes=2, process_id=2, env={})
  with pytest.raises(ConfigError, match="HOST:PORT"):
    distributed.make_setup(coordinator_address="h", num_processes=2, process_id=0, env={})
  assert jax.process_count() == 1


def _stub(path, body):
  path.write_text("#!/bin/bash\n" + body)
  path.chmod(0o755)
  return path


def test_slurm_script_passes_the_first_node_and_each_task_its_id(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  # A long node list: reading only its first line must not break the pipe (pipefail).
  _stub(bin_dir / "scontrol", 'seq -f "node%03g" 1 200000\n')
  # srun: run the task command once per task, as SLURM would on each node.
  _stub(bin_dir / "srun", 'shift\nfor i in 0 1; do SLURM_PROCID=$i "$@"; done\n')
  python = _stub(tmp_path / "python", f'printf "%s\\n" "$@" > {tmp_path}/task_$SLURM_PROCID\n')
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(python),
             SLURM_JOB_NODELIST="node[001-002]", SLURM_JOB_ID="77", SLURM_NTASKS="2")
  env.pop("KPTJAX_COORDINATOR_PORT", None)
  subprocess.run(["bash", str(REPO / "launch" / "slurm_gpu.sbatch"), "--workdir", "/runs/a b",
                  "--config.train.num_steps=3"], env=env, check=True, capture_output=True)
  for i in (0, 1):
    assert (tmp_path / f"task_{i}").read_text().splitlines() == [
        "-m", "kptjax.train", f"--coordinator_address=node001:{77 % 4096 + 61440}",
        "--num_processes=2", f"--process_id={i}", "--workdir", "/runs/a b",
        "--config.train.num_steps=3"]


def test_tpu_script_runs_one_command_on_every_worker(tmp_path):
  calls = tmp_path / "gcloud_args"
  gcloud = _stub(tmp_path / "gcloud", f'printf "%s\\n" "$@" > {calls}\n')
  env = dict(os.environ, GCLOUD=str(gcloud), KPTJAX_DIR=str(tmp_path / "checkout"))
  subprocess.run(["bash", str(REPO / "launch" / "tpu_pod.sh"), "train", "pod1", "us-east5-a",
                  "--workdir", "gs://b/run", "--config.data.knobs=a b"],
                 env=env, check=True, capture_output=True)
  args = calls.read_text().split("\n", 9)
  assert args[:8] == ["compute", "tpus", "tpu-vm", "ssh", "pod1", "--zone", "us-east5-a",
                      "--worker=all"]
  command = args[8].removeprefix("--command=").rstrip("\n")
  # What every worker runs: the checkout's venv python with --multihost and the args intact.
  venv = tmp_path / "checkout" / ".venv" / "bin"
  venv.mkdir(parents=True)
  _stub(venv / "python", f'printf "%s\\n" "$@" > {tmp_path}/worker_args\n')
  subprocess.run(["bash", "-c", command], check=True, cwd=tmp_path)
  assert (tmp_path / "worker_args").read_text().splitlines() == [
      "-m", "kptjax.train", "--multihost", "--workdir", "gs://b/run", "--config.data.knobs=a b"]
  assert (tmp_path / "checkout" / "kptjax_train.pid").read_text().strip().isdigit()
