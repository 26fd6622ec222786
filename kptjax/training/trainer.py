r"""The training run: ``build`` the compiled pieces, ``init_state``, and ``run`` the loop.

``python -m kptjax.train`` (flags) calls ``run(config, workdir)``; notebooks and tests call
``build`` / ``init_state`` / ``run`` directly. The model variant (which module, batch
fields, forward pass and loss terms) comes from ``kptjax.models.factory.variant_of``; the
one step for every variant is ``kptjax.training.step.make_train_step``.

Restarting with the same workdir resumes from the latest checkpoint in
``WORKDIR/checkpoints`` (params, optimizer state and data-iterator state), so a
preempted run ends with the same params as an uninterrupted one.

Periodic evaluation: set ``config.train.evaluator = 'package.module:factory'`` (the
keypoint evaluator is ``'kptjax.evaluate:make_train_evaluator'``) and
``config.train.eval_every``. The factory is called once as
``factory(config, model, mesh) -> eval_fn`` and ``eval_fn(state, step)`` (state: a
``TrainState``; step: the number of updates done) returns a mapping of scalar metrics,
written under ``eval/``. ``run(..., eval_fn=...)`` takes the callable directly.

A training image that cannot be read is skipped (``kptjax.data.pipeline``); each logged
step carries ``skipped_images``, the number skipped since this process started.
``data.strict_images=True`` stops at the first one instead.

Outputs in WORKDIR: TensorBoard events, ``metrics.jsonl``
(``kptjax.training.metrics_writer``), ``checkpoints/``, and ``adapter.safetensors`` (the
trained LoRA + projector weights, ``kptjax.convert.export_adapter``, when not every param
is trained). ``model_config.json`` holds the model section actually built
(Hugging Face checkpoints decide the architecture numbers).

Before anything is loaded, compiled or written, the run checks (``preflight.requested_model``):
the checkpoint dirs are of a supported type, the model agrees with the tokenizer and
the data (``kptjax.training.preflight.check_agreement``), and on resume the model is the
one the workdir holds (``model_config.json``; fields in ``train.resume_may_change`` may
differ). Then the workdir is checked writable (``checkpoint.Checkpointer``). A failed
background save stops the run at the next step, naming its step; a non-finite loss names
what its batch held (``kptjax.training.divergence``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from kptjax import convert, sharding, storage
from kptjax.data import pipeline
from kptjax.errors import ConfigError
from kptjax.models import factory, vlm
from kptjax.training import (
    checkpoint,
    divergence,
    metrics_writer,
    optim,
    preflight,
    step as train_step,
)
from kptjax.training.step import TrainState

EvalFn = Callable[[TrainState, int], Mapping[str, float] | None]
ADAPTER_FILE = "adapter.safetensors"


@dataclasses.dataclass
class Trainer:
  """The compiled pieces of a run; ``build`` makes one, ``init_state`` fills it with params.

  Attributes:
    model: the Linen module of the config's variant (``factory.variant_of``).
    mesh: the device mesh (entered with ``jax.set_mesh`` while the step runs).
    rules: logical-axis rules.
    mask: bool tree over params, True on trainable leaves.
    tx: the optimizer over the trainable subtree.
    lr_schedule: step -> learning rate.
    abstract_params: ShapeDtypeStructs of the params (unboxed).
    state_shardings: TrainState of NamedShardings.
    step: the jitted update ``(state, batch) -> (state, metrics)``; donates ``state``.
    init_params: the jitted random init ``rng -> params`` (sharded by out_shardings).
    batch_keys: the batch fields ``step`` reads.
  """
  model: nn.Module
  mesh: jax.sharding.Mesh
  rules: sharding.Rules
  mask: Any
  tx: optax.GradientTransformation
  lr_schedule: optax.Schedule
  abstract_params: Any
  state_shardings: TrainState
  step: Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]
  init_params: Callable[[jax.Array], Any]
  batch_keys: tuple[str, ...]


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None,
          model: nn.Module | None = None) -> Trainer:
  """Model, optimizer, shardings and the jitted step; allocates nothing big.

  Args:
    config: a full config (model, optim, train, mesh sections are read).
    mesh: defaults to ``sharding.make_mesh(config.mesh)`` over all devices.
    model: defaults to the variant's module (``factory.variant_of(config).model``).
  """
  mesh = mesh or sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.mesh)
  variant = factory.variant_of(config)
  model = model or variant.model
  tc = config.train
  dp = sharding.data_parallel_size(mesh)
  k = config.optim.grad_accum_steps
  if tc.batch_size % (dp * k) or tc.batch_size % jax.process_count():
    raise ConfigError(f"train.batch_size={tc.batch_size} must be divisible by the data-parallel "
                      f"size {dp} x optim.grad_accum_steps={k} and by the "
                      f"{jax.process_count()} processes")

  def init_boxed(rng):
    with nn.logical_axis_rules(rules):
      return model.init(rng, *vlm.dummy_inputs(config.model), **variant.init_kwargs())["params"]

  boxed = jax.eval_shape(init_boxed, jax.random.key(0))
  param_shardings = sharding.logical_shardings(boxed, mesh, rules)
  abstract_params = nn.unbox(boxed)
  mask = optim.trainable_mask(abstract_params, config.optim.trainable)
  lr_schedule = optim.schedule(config.optim, tc.num_steps)
  tx = optim.make_optimizer(config.optim, tc.num_steps)

  trainable_abs, _ = optim.split(abstract_params, mask)
  opt_abs = jax.eval_shape(tx.init, trainable_abs)
  trainable_sh, _ = optim.split(param_shardings, mask)
  repl = sharding.replicated(mesh)
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, opt_abs, trainable_sh, transform_non_params=lambda _: repl,
      is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  state_shardings = TrainState(step=repl, params=param_shardings, opt_state=opt_shardings)

  step_fn = train_step.make_train_step(
      model, tx, mask, forward=variant.forward, loss_terms=variant.loss_terms,
      lr_schedule=lr_schedule, rules=rules, grad_accum_steps=k, seed=config.seed,
      loss_chunk=tc.get("loss_chunk", 0), mesh=mesh)
  batch_shardings = {key: sharding.batch_sharding(mesh) for key in variant.batch_keys}
  step = jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, repl), donate_argnums=0)
  init_params = jax.jit(lambda rng: vlm.rescale_init(nn.unbox(init_boxed(rng)), config.model),
                        out_shardings=param_shardings)
  return Trainer(model=model, mesh=mesh, rules=rules, mask=mask, tx=tx,
                 lr_schedule=lr_schedule, abstract_params=abstract_params,
                 state_shardings=state_shardings, step=step, init_params=init_params,
                 batch_keys=variant.batch_keys)


def abstract_state(trainer: Trainer) -> TrainState:
  """The TrainState as ShapeDtypeStructs with shardings (a restore target)."""
  params = trainer.abstract_params
  trainable, _ = optim.split(params, trainer.mask)
  shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                      opt_state=jax.eval_shape(trainer.tx.init, trainable))
  return checkpoint.abstract(shapes, trainer.state_shardings)


def init_state(trainer: Trainer, config: ml_collections.ConfigDict,
               params: Any | None = None) -> TrainState:
  """Step-0 state: ``params`` (or a random init), then a stage-1 checkpoint on top.

  Args:
    trainer: from ``build``.
    config: reads ``seed`` and ``checkpoints.init_from`` (a kptjax workdir or its
      ``checkpoints`` dir, e.g. stage 1: every param saved there overrides ``params``).
    params: e.g. from ``kptjax.convert.load_vlm`` (host or device arrays; they are
      resharded and donated). None = random init, sharded from the start.
  """
  if params is None:
    params = trainer.init_params(jax.random.key(config.seed))
  else:
    missing = set(trainer.abstract_params) - set(params)   # e.g. KptLLM's prompt modules
    if missing:
      fresh = trainer.init_params(jax.random.key(config.seed))
      params = {**{name: fresh[name] for name in missing}, **params}
    params = jax.device_put(params, trainer.state_shardings.params)
  if config.checkpoints.init_from:
    params, _ = checkpoint.load_params(config.checkpoints.init_from, params,
                                       trainer.state_shardings.params)
  init = functools.partial(train_step.init_state, tx=trainer.tx, mask=trainer.mask)
  return jax.jit(init, out_shardings=trainer.state_shardings, donate_argnums=0)(params)


def make_eval_fn(config: ml_collections.ConfigDict, model: nn.Module,
                 mesh: jax.sharding.Mesh) -> EvalFn | None:
  """``config.train.evaluator`` ('module:factory') -> ``factory(config, model, mesh)``."""
  spec = config.train.get("evaluator", "")
  if not spec:
    return None
  module, _, name = spec.partition(":")
  if not name:
    raise ConfigError(f"train.evaluator={spec!r}; expected 'package.module:factory'")
  return getattr(importlib.import_module(module), name)(config, model, mesh)


def make_dataset(config: ml_collections.ConfigDict):
  """This process's slice of the training data, as a grain IterDataset of batches
  (``kptjax.data.pipeline.make_train_dataset`` picks the elements: localization rounds,
  KptLLM tasks with supports, or stage-1 captions), tokenized by ``factory.tokenizer``."""
  return pipeline.make_train_dataset(
      config, factory.tokenizer(config), process_index=jax.process_index(),
      process_count=jax.process_count())


def write_adapter(params: Any, mask: Any, path: str) -> None:
  """The trained leaves of ``params`` (where ``mask``) gathered to the host (every process
  takes part), written by process 0 with ``convert.export_adapter`` (LoRA + projector)."""
  trainable, _ = optim.split(params, mask)
  host = multihost_utils.process_allgather(trainable, tiled=True)
  if jax.process_index() == 0:
    convert.export_adapter(host, path)


def run(config: ml_collections.ConfigDict, workdir: str, *, eval_fn: EvalFn | None = None,
        preempt_at_step: int | None = None, mesh: jax.sharding.Mesh | None = None,
        dataset: Any = None, trainer: Trainer | None = None) -> TrainState:
  """Trains to ``config.train.num_steps`` (resuming from ``workdir``), returns the state.

  Args:
    config: the full config.
    workdir: output directory; an existing checkpoint there is resumed.
    eval_fn: periodic evaluation hook (overrides ``config.train.evaluator``).
    preempt_at_step: stop after this step as if preempted (a checkpoint is saved first).
    mesh: defaults to the config's mesh over all devices.
    dataset: a grain IterDataset of batches (default: ``make_dataset(config)``).
    trainer: reuse the compiled pieces of an earlier ``build(config, mesh)`` (notebooks,
      tests); it must come from the same config.
  """
  # parameter_overview / periodic_actions import TensorFlow: only a run pays for it.
  from clu import parameter_overview, periodic_actions  # pylint: disable=g-import-not-at-top

  # -------------------------------------- checks: before anything is read or written
  is_main = jax.process_index() == 0
  workdir = workdir if "://" in workdir else os.path.abspath(workdir)
  ckpt_dir = os.path.join(workdir, checkpoint.CHECKPOINT_SUBDIR)
  resuming = bool(checkpoint.saved_steps(ckpt_dir))
  config = preflight.requested_model(config, workdir, resuming)
  tc = config.train

  # ------------------------------------------------------------------------ logging
  # Creating the checkpointer checks that the workdir can be written (one line if not)
  # and removes the unfinished saves of a killed run.
  ckpt = checkpoint.Checkpointer(ckpt_dir, every=tc.checkpoint_every,
                                 keep=tc.keep_checkpoints)
  logging.info("Process %d/%d holds %d/%d devices (%s); workdir %s", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform, workdir)
  has_model_config = (storage.path(workdir) / preflight.MODEL_CONFIG_FILE).exists()
  if is_main and (not resuming or has_model_config):
    preflight.write_model_config(workdir, config.model)
  writer = metrics_writer.make_writer(workdir, is_main)
  hf_params = None
  if not resuming and (config.checkpoints.llm_dir or config.checkpoints.vit_dir):
    _, hf_params = convert.load_vlm(config)

  # --------------------------------------------------------------- mesh, model, step
  trainer = trainer or build(config, mesh)
  logging.info("Mesh: %s", sharding.describe(trainer.mesh))
  logging.info("Trainable (%s): %d of %d params", config.optim.trainable,
               optim.count(optim.split(trainer.abstract_params, trainer.mask)[0]),
               optim.count(trainer.abstract_params))

  # -------------------------------------------------------------------------- input
  dataset = dataset if dataset is not None else make_dataset(config)
  data_iter = iter(dataset)

  # ------------------------------------------------------- init, or resume the state
  if tc.stage == 2 and not config.checkpoints.init_from and not resuming:
    logging.warning("Stage 2 without checkpoints.init_from: the projector is not the "
                    "stage-1 one")
  if resuming:
    logging.info("Resuming from %s/%d", ckpt.directory, ckpt.latest_step())
    state = ckpt.restore(abstract_state(trainer), data_iter)
    if is_main and not has_model_config:   # a workdir of an older kptjax: now it has one
      logging.warning("%s had no %s: only the param shapes were checked", workdir,
                      preflight.MODEL_CONFIG_FILE)
      preflight.write_model_config(workdir, config.model)
  else:
    state = init_state(trainer, config, params=hf_params)
    del hf_params
  parameter_overview.log_parameter_overview(
      state.params, msg="Params", include_stats="global", jax_logging_process=0)
  first_step = int(jax.device_get(state.step))

  # ------------------------------------------------------------------------- evals
  eval_fn = eval_fn or make_eval_fn(config, trainer.model, trainer.mesh)

  def evaluate(step):
    if eval_fn is None:
      return
    with jax.set_mesh(trainer.mesh):
      result = eval_fn(state, step)
    if result:
      writer.write_scalars(step, {f"eval/{k}": v for k, v in result.items()})

  # -------------------------------------------------------------------------- loop
  report = periodic_actions.ReportProgress(num_train_steps=tc.num_steps, writer=writer)
  history: list[tuple[int, dict[str, jax.Array], dict[str, Any]]] = []  # step, metrics, facts
  t_last, steps_timed = None, 0
  skipped_images = 0   # training elements whose image could not be read (this process)
  bar = tqdm(total=tc.num_steps, initial=first_step, desc="train", disable=not is_main)
  logging.info("Training steps %d..%d; compiling the step", first_step + 1, tc.num_steps)
  try:
    for step in range(first_step + 1, tc.num_steps + 1):
      host_batch = next(data_iter)
      skipped_images += int(np.sum(host_batch.get(pipeline.SKIPPED_IMAGES, 0)))
      inputs = {k: host_batch[k] for k in trainer.batch_keys}
      facts = divergence.inspect_batch(inputs, config.model.llm.vocab_size)
      batch = sharding.shard_batch(inputs, trainer.mesh)
      with jax.set_mesh(trainer.mesh):
        state, metrics = trainer.step(state, batch)
      history.append((step, metrics, facts))
      ckpt.check()   # a failed background save stops the run now, naming its step
      if t_last is None:  # The first step includes compilation: time from its end.
        history = jax.device_get(history)
        logging.info("First step (with compilation) done")
        t_last = time.perf_counter()
      else:
        steps_timed += 1
      report(step)
      if len(history) > 1:   # the bar counts finished steps; one step stays in flight
        jax.block_until_ready(history[-2][1])
      bar.update(1)

      save_now = step % tc.checkpoint_every == 0 or step in (tc.num_steps, preempt_at_step)
      if step % tc.log_every == 0 or save_now:   # never checkpoint a NaN state
        history = jax.device_get(history)
        divergence.check_finite(history, config.model.llm.vocab_size)
        scalars = {k: float(v) for k, v in history[-1][1].items()}
        scalars[pipeline.SKIPPED_IMAGES] = skipped_images
        now = time.perf_counter()
        if steps_timed:
          tokens = sum(float(m["input_tokens"]) for _, m, _ in history[-steps_timed:])
          scalars.update(step_time=(now - t_last) / steps_timed,
                         tokens_per_sec=tokens / (now - t_last))
        writer.write_scalars(step, scalars)
        history, t_last, steps_timed = [], now, 0
      if save_now:
        ckpt.save(step, state, data_iter, force=True)
      if tc.eval_every and step % tc.eval_every == 0:
        evaluate(step)
      if step == preempt_at_step:
        logging.info("Stopping after step %d as asked (preempt_at_step)", step)
        break
  finally:
    bar.close()
    if skipped_images:
      logging.warning("Skipped %d training examples whose image could not be read (named "
                      "above; --strict stops at the first)", skipped_images)
    ckpt.wait()
    ckpt.close()
    writer.flush()

  if int(jax.device_get(state.step)) == tc.num_steps and config.optim.trainable != "all":
    write_adapter(state.params, trainer.mask, os.path.join(workdir, ADAPTER_FILE))
  writer.close()
  return state
