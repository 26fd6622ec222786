"""LocLLM on COCO keypoints (CVPR 2024), stage 2: the paper's model and recipe.

DINOv2 ViT-L/14 at 224 px (position embeddings resized from the 518 grid: 16x16 = 256
image tokens) -> Linear(1024 -> 4096) -> Vicuna-7B v1.5, LoRA r=8 alpha=16 dropout 0.05 on
q and v of both towers; AdamW lr 5e-4, weight decay 0.05, 3% warmup, cosine, global batch
64, 12 epochs (numbers from the public code, ../shared/papers/README.md).

Variants (``--config configs/locllm_coco.py:ARG``, comma separated):
  epochs=N     train N epochs (the paper's ablations use 3).
  batch=N      global batch size (steps are recomputed).
  accum=N      gradient accumulation steps (per-step batch = batch / accum).
  mlp          PoseLLM's projector (see posellm_coco.py).
  runlocal     a smoke run of the full-size model: 4 steps of batch 2, no eval.
  clip         LocLLM's CLIP baseline (Tables 4, 6, 7, 8): CLIP ViT-L/14 at 224 px
               (checkpoints/clip-vit-large-patch14) in place of DINOv2.
Checkpoint dirs are fields: ``--config.checkpoints.llm_dir=/ckpt/vicuna-7b-v1.5``.
"""

from configs import common


def get_config(arg=None):
  return common.coco_config(common.parse_arg(arg)).lock()


def sweep():
  """Ablations of the paper (Tables 4-7), as lists of dotted config overrides.

  Each entry: (config arg, {field: value}); the paper's ablations train 3 epochs.
  """
  return common.locllm_ablations()
