r"""One process of the multi-process training tests (``tests/test_multiprocess.py``).

    python launch/local.py -n 2 --devices_per_process 4 -- \
        python tests/mp_train_worker.py --workdir W [--kill_at_step 3] [--gather_out F]

Trains ``configs/tiny.py:lora`` (LoRA dropout 0.1) on a mesh data=1 x fsdp=4 x tensor=2
over all devices of all processes, with ``kptjax.training.trainer.run``. The data is the
pipeline's single-process stream of global batches, of which process I takes rows
``[I * B / N, (I + 1) * B / N)``, the rows its devices hold in the global batch: so any
number of processes sees the same global batches, and runs must agree. (The pipeline's
own per-process slicing, ``make_train_dataset(process_index=...)``, gives each process
other records, so its global batches depend on the process count.)

``--kill_at_step S``: after step S, once the checkpoint ``--kill_after_checkpoint`` is
finished on disk, process ``--kill_process`` SIGKILLs itself, as a host that dies.
``--gather_out F``: after training, each process takes its ``split_for_process`` block
of ``GATHER_ITEMS`` items and ``gather_to_process0`` collects them; process 0 writes F.
"""

import os
import signal
import time

import jax
from absl import app, flags

from configs import tiny
from kptjax import distributed, storage
from kptjax.data import pipeline, tokenizer
from kptjax.training import trainer as trainer_lib

FLAGS = flags.FLAGS
GATHER_ITEMS = 7


def config_for_test(num_steps: int, checkpoint_every: int):
  config = tiny.get_config("lora")
  with config.unlocked():
    config.model.lora.dropout = 0.1
    config.mesh.shape.update(data=1, fsdp=4, tensor=2)
    config.train.update(num_steps=num_steps, checkpoint_every=checkpoint_every, log_every=1,
                        batch_size=4)
  return config


def process_rows(config):
  """This process's rows of the single-process stream of global batches."""
  stream = pipeline.make_train_dataset(config, tokenizer.load_tokenizer(""))
  local = config.train.batch_size // jax.process_count()
  lo = jax.process_index() * local
  return stream.map(lambda batch: {k: v[lo:lo + local] for k, v in batch.items()})


def gather_item(i: int) -> dict:
  """Item i of the gather check (what one process would compute for person i)."""
  return {"id": i, "xy": [i / 3.0, 1e-7 * i], "process": jax.process_index()}


def main(argv):
  del argv
  distributed.initialize(distributed.setup_from_flags(FLAGS))
  config = config_for_test(FLAGS.num_steps, FLAGS.checkpoint_every)
  finished = storage.path(FLAGS.workdir) / "checkpoints" / str(FLAGS.kill_after_checkpoint)

  def die_at(state, step):
    del state
    if step == FLAGS.kill_at_step and jax.process_index() == FLAGS.kill_process:
      deadline = time.monotonic() + 120
      while not finished.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
      os.kill(os.getpid(), signal.SIGKILL)

  with config.unlocked():
    config.train.eval_every = 1 if FLAGS.kill_at_step else 0
  trainer_lib.run(config, FLAGS.workdir, eval_fn=die_at, dataset=process_rows(config))
  if FLAGS.gather_out:
    block = distributed.split_for_process(GATHER_ITEMS)
    gathered = distributed.gather_to_process0(
        [gather_item(i) for i in range(block.start, block.stop)])
    if jax.process_index() == 0:
      storage.write_json_atomic(FLAGS.gather_out, gathered)


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "Output directory.", required=True)
  flags.DEFINE_integer("num_steps", 4, "Training steps.")
  flags.DEFINE_integer("checkpoint_every", 2, "Checkpoint interval.")
  flags.DEFINE_integer("kill_at_step", None, "SIGKILL --kill_process after this step.")
  flags.DEFINE_integer("kill_after_checkpoint", 2, "... once this checkpoint is finished.")
  flags.DEFINE_integer("kill_process", 1, "Which process dies at --kill_at_step.")
  flags.DEFINE_string("gather_out", None, "Write the gather check's list here (process 0).")
  distributed.define_flags()
  app.run(main)
