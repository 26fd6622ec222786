"""Evaluation on 2 real processes (``launch/local.py``, CPU, gloo) writes what 1 process
writes: each process decodes its block of persons (``distributed.split_for_process``),
process 0 gathers them and writes ``predictions.json`` (byte-identical) and
``metrics.json`` (equal apart from timing fields); no partial file is left behind. The
MP-100 protocol (KptLLM's 1-shot visual prompts on synthetic objects) splits its queries
the same way and writes the same ``metrics.json``."""

import json
import os
import pathlib
import subprocess
import sys

from kptjax.data import synthetic_objects

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMING = ("wall_s", "first_batch_s", "persons_per_s")


def _evaluate_cmd(shared_data, out):
  d = shared_data / "coco"
  return [sys.executable, "-m", "kptjax.evaluate", "--config", str(REPO / "configs/tiny.py"),
          f"--dataset=coco,ann_file={d / 'test_coco.json'},image_root={d}",
          "--max_persons=7", "--config.decode.batch_persons=2", f"--out={out}"]


def _one_and_two(cmd, tmp_path):
  """Runs ``cmd(out)`` as 1 process and (at the same time) as 2 processes."""
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  one = subprocess.Popen(cmd(tmp_path / "one"), cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  two = subprocess.run(
      [sys.executable, str(REPO / "launch" / "local.py"), "-n", "2", "--devices_per_process",
       "1", "--timeout", "400", "--log_dir", str(tmp_path / "logs"), "--",
       *cmd(tmp_path / "two")], cwd=REPO, env=env, timeout=450)
  log_one = one.communicate(timeout=450)[0]
  logs = {p.name: p.read_text()[-2000:] for p in (tmp_path / "logs").glob("*.log")}
  assert one.returncode == 0, log_one[-3000:]
  assert two.returncode == 0, logs


def _metrics(tmp_path, run):
  m = json.loads((tmp_path / run / "metrics.json").read_text())
  for key in TIMING:
    m.pop(key, None)
  m["provenance"].pop("created", None)
  return m


def test_two_process_evaluation_writes_the_one_process_files(shared_data, tmp_path):
  _one_and_two(lambda out: _evaluate_cmd(shared_data, out), tmp_path)
  assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one")) == [
      "metrics.json", "predictions.json", "predictions.provenance.json"]
  preds = (tmp_path / "one" / "predictions.json").read_bytes()
  assert (tmp_path / "two" / "predictions.json").read_bytes() == preds
  assert len(json.loads(preds)) == 7
  assert _metrics(tmp_path, "one") == _metrics(tmp_path, "two")


def test_two_process_mp100_protocol_writes_the_one_process_metrics(tmp_path):
  ann, images = synthetic_objects.generate_objects(tmp_path / "objects", num_images=6,
                                                   split="val")

  def cmd(out):
    return [sys.executable, "-m", "kptjax.evaluate", "--config", str(REPO / "configs/tiny.py"),
            "--config.model.kpt.enabled=True", "--config.model.remat_policy=none",
            "--config.data.coord_format=keypoint_token", "--config.data.max_len=96",
            f"--dataset=mp100,ann_file={ann},image_root={images}", "--task=visual",
            "--shots=1", f"--out={out}"]
  _one_and_two(cmd, tmp_path)
  one, two = _metrics(tmp_path, "one"), _metrics(tmp_path, "two")
  assert one["questions"] > 0 and one == two
