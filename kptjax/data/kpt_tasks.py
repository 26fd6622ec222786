"""Old path of ``kptjax.data.tasks.kptllm`` for importers on the other sides
(``kptjax.kpt_evaluate``, ``tests/test_kpt_train_step.py``); delete once they import
``kptjax.data.tasks.kptllm``."""

from kptjax.data.tasks.kptllm import TaskEncoder, parse_tasks

__all__ = ["TaskEncoder", "parse_tasks"]
