r"""Checkpoint x dataset x task -> ``predictions.json`` + ``metrics.json``: the one
evaluation CLI (``kptjax.evaluation.runner.run``).

    # LocLLM / PoseLLM: every keypoint of every person (task 'keypoints')
    python -m kptjax.evaluate --config configs/tiny.py --checkpoint WORKDIR \
        --dataset coco,ann_file=/data/coco/person_keypoints_val2017.json,image_root=/data/coco/val2017 \
        --out results/coco

    # KptLLM / CapeLLM on MP-100: 5-shot visual prompts (the protocol's default task)
    python -m kptjax.evaluate --config configs/kptllm_mp100.py:split=1 \
        --checkpoint WORKDIR --task visual --shots 5 --out WORKDIR/eval_split1_5shot

``--dataset`` is a source name of ``kptjax.data.sources.read_dataset`` followed by its
keyword arguments (``ann_file``, ``image_root``, ``det_file``, ``headbox_file``,
``camera_file``, ...); without it the config's ``data.eval`` set is used. How the
dataset is scored (OKS AP by COCO / CrowdPose / AIC's setting, PCKh, MPJPE, MP-100's
PCK per category) comes from ``kptjax.evaluation.protocols``; the files written are
described in ``kptjax.evaluation.results``.

Several processes (``launch/local.py``, a TPU pod, SLURM; the start-up flags of
``kptjax.distributed``): each decodes its block of persons on its own devices, process 0
gathers them in single-process order and writes the same files one process writes.

The periodic-evaluation hook of ``kptjax.train`` is
``config.train.evaluator = 'kptjax.evaluate:make_train_evaluator'``.
"""

from __future__ import annotations

from typing import Sequence

from absl import app, flags
from ml_collections import config_flags

from kptjax import distributed, errors, xla_cpu
from kptjax.evaluation.loading import load_tokenizer
from kptjax.evaluation.persons import make_train_evaluator
from kptjax.evaluation.protocols import PERSON_TASK, PROMPTED_TASKS
from kptjax.evaluation.runner import run, summary_lines

# The names other entry points reach through this module: ``run`` (kptjax.demo),
# ``make_train_evaluator`` (config.train.evaluator), ``load_tokenizer`` (kptjax.train).
__all__ = ("main", "make_train_evaluator", "load_tokenizer", "run")


def _define_flags() -> None:
  """CLI flags (defined only when run as a program, so importing this module is free)."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).")
  flags.DEFINE_string("checkpoint", "", "kptjax workdir or checkpoints dir.")
  flags.DEFINE_string("dataset", "", "'source,key=value,...' (default: config.data.eval).")
  flags.DEFINE_string("out", None, "Output directory.")
  flags.DEFINE_string("workdir", None, "Alias of --out.")
  flags.DEFINE_enum("task", "", ["", PERSON_TASK, *PROMPTED_TASKS],
                    "What is asked ('' = the dataset protocol's default: 'keypoints', or "
                    "'visual' on MP-100).")
  flags.DEFINE_integer("shots", 1, "Supports per query (task 'visual').")
  flags.DEFINE_integer("seed", 0, "Support draw (task 'visual').")
  flags.DEFINE_integer("max_persons", None, "Evaluate only the first N persons.")
  flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
  flags.DEFINE_enum("pckh_variant", "standard", ["standard", "locllm"],
                    "Joints in the PCKh mean (metrics.PCKH_MEAN_EXCLUDE).")
  flags.DEFINE_bool("mpii_box_pck", False, "MPII without head boxes: report box PCK only "
                    "(default: refuse, PCKh needs headbox_file).")
  distributed.define_flags()
  flags.mark_flag_as_required("config")


def main(argv: Sequence[str]) -> None:
  del argv
  xla_cpu.configure()
  f = flags.FLAGS
  out = f.out or f.workdir
  if not out:
    raise app.UsageError("--out (or --workdir) is required")
  distributed.initialize(distributed.setup_from_flags(f))
  try:
    result = run(f.config, out, checkpoint=f.checkpoint, dataset=f.dataset, task=f.task,
                 shots=f.shots, seed=f.seed, max_persons=f.max_persons,
                 pckh_variant=f.pckh_variant, step=f.step, mpii_box_pck=f.mpii_box_pck)
  except errors.KptjaxError as e:
    raise SystemExit(f"error: {e}") from None
  for line in summary_lines(result) if result else ():   # {} on processes other than 0
    print(line)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
