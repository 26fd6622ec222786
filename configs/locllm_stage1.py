"""LocLLM stage 1 (CVPR 2024): align the projector on image-caption pairs, LLaVA-style.

The model of ``configs/locllm_coco.py`` (DINOv2 ViT-L/14 -> Linear -> Vicuna-7B v1.5);
LLaVA's CC3M-595K pairs (``chat.json`` + ``images/``, ``kptjax.data.sources`` 'llava';
batches of ``kptjax.data.tasks.captions``: the caption and ``</s>`` carry the loss); only
the projector trains. LocLLM does not give the stage-1 numbers; these are LLaVA-1.5's
pretraining ones: lr 1e-3, no weight decay, 3% warmup, cosine, global batch 256, 1 epoch.

    python -m kptjax.train --config configs/locllm_stage1.py --workdir W1
    python -m kptjax.train --config configs/locllm_coco.py --workdir W2 \
        --config.checkpoints.init_from=W1

Variants: ``epochs=N``, ``batch=N``, ``accum=N``, ``runlocal`` (as locllm_coco.py),
``clip`` (the CLIP baseline's tower).
"""

from configs import common

CC3M_595K_PAIRS = 595_375   # LLaVA-CC3M-Pretrain-595K


def get_config(arg=None):
  args = common.parse_arg(arg)
  args.setdefault("batch", "256")
  args.setdefault("epochs", "1")
  c = common.coco_config(args)
  c.data.train = common.dataset("llava", "data/llava_cc3m_595k", "train",
                                ann_file="data/llava_cc3m_595k/chat.json",
                                image_root="data/llava_cc3m_595k/images")
  c.optim.trainable = "projector"
  c.optim.lr, c.optim.weight_decay = 1e-3, 0.0
  c.train.stage = 1
  if not args.get("runlocal"):
    c.train.num_steps = common.steps_for(float(args["epochs"]), CC3M_595K_PAIRS,
                                         c.train.batch_size)
  return c.lock()
