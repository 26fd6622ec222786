r"""Trains a model: ``python -m kptjax.train --config configs/X.py[:arg] --workdir DIR``.

Overrides: ``--config.optim.lr=1e-4``. Multi-host: ``--multihost`` or
``--coordinator_address/--num_processes/--process_id`` start the processes first
(``kptjax.distributed``; launch scripts in ``launch/``); every process then reads its own
slice of the data and only process 0 writes logs, metrics and the adapter export. ``--strict``
(``data.strict_images=True``) stops at the first training image that cannot be read
instead of skipping and counting it.

The run itself (resume, checks, outputs in WORKDIR, periodic evaluation) is
``kptjax.training.trainer.run``.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from kptjax import distributed, xla_cpu
from kptjax.training import trainer

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Flags of the CLI (defined only when run as a program, so importers may define theirs)."""
  config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Output directory (checkpoints, metrics, TensorBoard).")
  distributed.define_flags()   # --multihost, --coordinator_address, --num_processes, ...
  flags.DEFINE_bool("strict", False, "Stop at the first training image that cannot be read "
                    "(data.strict_images=True) instead of skipping and counting it.")
  flags.DEFINE_integer("preempt_at_step", None,
                       "Stop after this step as if preempted (checkpoint first); for tests.")


def main(argv):
  del argv
  xla_cpu.configure()
  distributed.initialize(distributed.setup_from_flags(FLAGS))
  config = FLAGS.config
  if FLAGS.strict:
    with config.unlocked():
      config.data.strict_images = True
  trainer.run(config, FLAGS.workdir, preempt_at_step=FLAGS.preempt_at_step)


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
