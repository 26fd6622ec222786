"""PoseLLM on COCO keypoints (arXiv 2507.09139): LocLLM with a 2-layer GELU MLP connector
(Linear 1024 -> 4096, GELU, Linear 4096 -> 4096) in place of the linear projector; the
rest of the recipe as configs/locllm_coco.py (PoseLLM reports 77.8 AP on COCO val).

Variants: those of locllm_coco.py (``epochs=N``, ``batch=N``, ``accum=N``, ``runlocal``).
"""

from configs import common


def get_config(arg=None):
  return common.coco_config({**common.parse_arg(arg), "mlp": True}).lock()


def sweep():
  """PoseLLM's ablations (3 epochs each): LocLLM's list with the MLP connector, plus the
  linear connector for comparison."""
  runs = [(arg, overrides) for arg, overrides in common.locllm_ablations()
          if "mlp" not in arg.split(",")]
  return runs + [("epochs=3", {"model.projector.kind": "linear"})]
