"""``WORKDIR/metrics.jsonl``: one JSON object per logged step, appended across restarts.

Rows are ``{"step": s, name: value, ...}``: the train scalars of ``kptjax.training.step``
(loss, lm_loss, accuracy, lr, grad_norm, answer_tokens, input_tokens, ...; step_time in
seconds, tokens_per_sec) and the periodic evaluator's under ``eval/``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from kptjax import storage

METRICS_FILE = "metrics.jsonl"


class JsonlWriter:
  """A clu ``MetricWriter`` (duck-typed, so that importing this module does not import
  TensorFlow) appending ``{"step": s, name: value, ...}`` lines to a file; scalars only."""

  def __init__(self, path: str):
    self._path = path

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    storage.append_text(self._path, json.dumps(row) + "\n")

  def write_summaries(self, step, values, metadata=None): pass
  def write_images(self, step, images): pass
  def write_videos(self, step, videos): pass
  def write_audios(self, step, audios, *, sample_rate): pass
  def write_texts(self, step, texts): pass
  def write_histograms(self, step, arrays, num_buckets=None): pass
  def write_hparams(self, hparams): pass

  def flush(self): pass
  def close(self): pass


def make_writer(workdir: str, is_main: bool):
  """TensorBoard events + ``metrics.jsonl`` on the main process, logging only elsewhere."""
  # clu imports TensorFlow (for the TensorBoard writer): only a run pays for it.
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
  if is_main:
    writer = metric_writers.MultiWriter([writer, JsonlWriter(os.path.join(workdir, METRICS_FILE))])
  return writer


def read_metrics(workdir: str) -> list[dict[str, float]]:
  """The rows of ``WORKDIR/metrics.jsonl`` (train and eval), in the order written."""
  text = (storage.path(workdir) / METRICS_FILE).read_text()
  return [json.loads(line) for line in text.splitlines() if line.strip()]
