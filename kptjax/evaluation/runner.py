"""One evaluation: checkpoint x dataset x task -> the out dir's files
(``kptjax.evaluation.results``). The protocol (``protocols.protocol_for``: the records'
kind, or ``config.data.eval.protocol``) says how it is scored and which task runs when
none is asked:

  task 'keypoints'  every keypoint of the spec per person (``persons``): predictions.json,
                    its provenance sidecar and metrics.json; resumable.
  task 'visual' | 'textual' | 'semantic'
                    prompted questions (``prompted``, KptLLM / CapeLLM; MP-100's default
                    is 'visual'): metrics.json.

When ``out_dir`` already holds the outputs of a run with the same provenance, nothing
is recomputed (the saved metrics are returned); outputs or partial predictions made
otherwise are discarded (logged).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import jax

from kptjax import distributed, errors, storage
from kptjax.evaluation import loading, persons, prompted, protocols, results

ModelLoader = Callable[..., tuple[Any, Any, Any]]


def run(config: Any, out_dir: str, *, checkpoint: str = "", dataset: str = "",
        task: str = "", shots: int = 1, seed: int = 0, rows_per_batch: int = 16,
        max_persons: Optional[int] = None, pckh_variant: str = "standard",
        mpii_box_pck: bool = False, progress: bool = True,
        model_params: Optional[tuple[Any, Any]] = None, tokenizer: Any = None,
        step: Optional[int] = None,
        model_loader: Optional[ModelLoader] = None) -> dict[str, Any]:
  """Evaluates one checkpoint on one dataset; returns the metrics dict.

  Args:
    config: the full config; its model section is replaced by the checkpoint's
      ``model_config.json`` when there is one.
    out_dir: where the files go.
    checkpoint: a training workdir or its checkpoints dir ('' = ``config.checkpoints``'
      Hugging Face dirs, else random weights).
    dataset: 'source,key=value,...' (``kptjax.data.sources.read_dataset``); '' = the
      config's ``data.eval``.
    task: 'keypoints', 'visual', 'textual' or 'semantic' ('' = the protocol's default).
    shots, seed, rows_per_batch: prompted tasks (supports per query, their draw,
      questions per batch).
    max_persons: 'keypoints': only the first N persons.
    pckh_variant: 'standard' or 'locllm' (``metrics.pckh``).
    mpii_box_pck: (or ``config.decode.mpii_box_pck``) MPII without head boxes reports
      box PCK (else ConfigError, before any decoding).
    step: the checkpoint step to evaluate (default: its latest).
    model_params: (model, params) to use instead of loading (sweeps, tests; the caller
      vouches that they are ``checkpoint``'s at ``step``).
    tokenizer: skips loading it.
    model_loader: ``(config, checkpoint, step) -> (config, model, params)`` called only
      when something has to be decoded (default ``loading.load_model``).
  """
  config = loading.resolve_config(config, checkpoint)
  step = loading.checkpoint_step(checkpoint) if step is None else step
  records = loading.load_eval_records(config, dataset)
  if not len(records):
    raise errors.DataError(getattr(records, "source", dataset), "no persons to evaluate")
  protocol = protocols.protocol_for(records, config)
  task = task or protocol.default_task
  if task not in (protocols.PERSON_TASK,) + protocols.PROMPTED_TASKS:
    raise errors.ConfigError(f"task {task!r}; expected one of "
                             f"{[protocols.PERSON_TASK, *protocols.PROMPTED_TASKS]}")
  person_task = task == protocols.PERSON_TASK
  options = {"max_persons": max_persons, "pckh_variant": pckh_variant} if person_task else \
      {"task": task, "shots": shots, "seed": seed, "rows_per_batch": rows_per_batch}
  record = results.eval_provenance(config, records, checkpoint=checkpoint, dataset=dataset,
                                   dataset_values=loading.dataset_values(config, dataset),
                                   step=step, evaluation=options)
  saved = results.saved_result(out_dir, record,
                               results.FINAL_FILES if person_task else (results.METRICS,))
  if saved is not None:
    return saved
  mpii_box_pck = mpii_box_pck or bool(config.decode.get("mpii_box_pck", False))
  if person_task:
    protocols.check_protocol(records, mpii_box_pck, protocol)
    spec = protocols.keypoint_spec(records, max_persons)
  if model_params is None:
    config, *model_params = (model_loader or loading.load_model)(config, checkpoint, step)
  model, params = model_params
  tokenizer = tokenizer or loading.load_tokenizer(config)
  os.makedirs(out_dir, exist_ok=True)
  common = {"dataset": dataset or dict(config.data.eval), "checkpoint": checkpoint,
            "checkpoint_step": step, "provenance": record}
  if not person_task:
    if task == "semantic":
      result = prompted.evaluate_semantic(config, model, params, tokenizer, records,
                                          rows_per_batch=rows_per_batch)
    else:
      result = prompted.evaluate_cape(config, model, params, tokenizer, records, task=task,
                                      shots=shots, seed=seed, rows_per_batch=rows_per_batch,
                                      coco_gt=protocols.oks_ground_truth(records, protocol),
                                      protocol=protocol)
      if not result:                   # not process 0 (the queries were split)
        return {}
    result.update(task=task, shots=shots, seed=seed, **common,
                  protocol=protocols.protocol_record(protocol, records, config, task=task))
    if jax.process_index() == 0:   # the semantic task is not split: every process asks all
      storage.write_json_atomic(os.path.join(out_dir, results.METRICS), result)
    return result

  localizer = persons.make_localizer(config, model, params, tokenizer, spec)
  is_3d = localizer.count == 3
  indices = list(range(len(records)))[:max_persons]
  # Several processes: each decodes its block of persons on its own devices, process 0
  # gathers them (in single-process order) and writes the outputs.
  part = distributed.split_for_process(len(indices))
  partial_name = results.PARTIAL if jax.process_count() == 1 else \
      f"{results.PARTIAL}.process-{jax.process_index()}-of-{jax.process_count()}"
  entries, timing = persons.decode_resumable(
      config, localizer, records, indices[part.start:part.stop], out_dir, record,
      progress=progress, partial_name=partial_name)
  entries = distributed.gather_to_process0(entries)
  if entries is None:                    # not process 0: its persons are with process 0
    os.remove(os.path.join(out_dir, partial_name))
    return {}                            # (``run`` returns the metrics on process 0 only)
  coco_gt = None if is_3d else protocols.oks_ground_truth(records, protocol)
  has_gt = not (dataset and "det_file=" in dataset) and not config.data.eval.get("det_file")
  root = getattr(spec, "root_index", None) or 0
  result = protocols.compute_metrics(records, entries, spec.names, coco_gt=coco_gt,
                                     sigmas=spec.sigmas, pckh_variant=pckh_variant,
                                     has_gt=has_gt, root=root, mpii_box_pck=mpii_box_pck,
                                     protocol=protocol)
  result.update({
      **common, "spec": spec.name, "task": task,
      "protocol": protocols.protocol_record(protocol, records, config, task=task,
                                            pckh_variant=pckh_variant,
                                            mpii_box_pck=mpii_box_pck),
      "decode": {"max_new_tokens": localizer.max_new_tokens, "constrained": localizer.constrained,
                 "share_prefix": localizer.share_prefix,
                 "batch_persons": int(config.decode.batch_persons)},
      **timing})
  predictions = results.predictions_file(records, entries, is_3d,
                                         protocols.category_ids(coco_gt, records), root)
  results.write_person_outputs(out_dir, predictions, result, record)
  os.remove(os.path.join(out_dir, partial_name))
  return result


def summary_lines(result: dict[str, Any]) -> list[str]:
  """A few human-readable lines of the headline numbers."""
  if "questions" in result:
    key = "accuracy" if result.get("task") == "semantic" else "PCK@0.2"
    return [f"{result.get('task')}: {key} {result.get(key, float('nan')):.4f} over "
            f"{result['questions']} questions, missing keypoints "
            f"{result.get('missing_keypoints', 0)}"]
  lines = [f"persons {result['num_persons']}, parse failures {result['parse_failures']}"
           f"/{result['num_answers']}, missing keypoints {result.get('missing_keypoints', 0)}, "
           f"unreadable images {len(result.get('unreadable_images', []))}"]
  for key in ("coco", "pck", "pckh", "mpjpe"):
    if key in result:
      vals = {k: v for k, v in result[key].items() if isinstance(v, (int, float))}
      lines.append(f"{key}: " + ", ".join(f"{k} {v:.4g}" for k, v in list(vals.items())[:8]))
  return lines
