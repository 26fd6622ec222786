"""Training elements: what one item of the train stream becomes (``pipeline.make_train_dataset``).

Every element builder is constructed as ``Builder(config, tokenizer, records)`` and called
as ``builder((record index, keypoint group or None), rng) -> dict`` of numpy arrays in the
train-batch contract (``image`` f32[S, S, 3], ``tokens`` / ``targets`` i32[T],
``loss_mask`` f32[T], ``input_mask`` bool[T], plus the variant's own fields); its
``name`` begins the pipeline's log lines.

Which builder a run gets is data, not a branch on dataset names:

* records with their own builder (``FOR_RECORD``): caption pairs -> ``CaptionElement``
  (stage 1);
* person records -> the model variant's builder (``FOR_VARIANT``, keyed by
  ``kptjax.models.factory.variant(config)``): 'vlm' (LocLLM, PoseLLM, CapeLLM) ->
  ``RoundsElement``; 'kptllm' -> ``KptTaskElement`` (tasks with supports).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from kptjax.data.sources import CaptionRecord
from kptjax.data.tasks.captions import CaptionElement
from kptjax.data.tasks.kptllm import KptTaskElement
from kptjax.data.tasks.rounds import RoundsElement
from kptjax.models import factory

Builder = Callable[[Any, Any, Sequence[Any]], Callable[..., dict]]

FOR_RECORD: dict[type, Builder] = {CaptionRecord: CaptionElement}
FOR_VARIANT: dict[str, Builder] = {"vlm": RoundsElement, "kptllm": KptTaskElement}


def element_for(config: Any, tokenizer: Any, records: Sequence[Any]) -> Callable[..., dict]:
  """The element builder of ``records`` (non-empty) under ``config`` (module docstring)."""
  builder = FOR_RECORD.get(type(records[0])) or FOR_VARIANT[factory.variant(config)]
  return builder(config, tokenizer, records)
