"""LocLLM Table 7: novel keypoints. Train on COCO without 4 keypoint types (right elbow,
left wrist, left knee, right ankle: never asked in a training conversation,
``data.heldout_keypoints``) and without data augmentation, as the paper does; evaluate on
all 17 (the usual COCO val evaluation: the held-out names are asked with their
descriptions). The paper's ablation length: 3 epochs.

    python -m kptjax.train --config configs/locllm_novel.py --workdir W
    python -m kptjax.evaluate --config configs/locllm_novel.py --checkpoint W --out W/eval

``metrics.json['protocol']['heldout_keypoints']`` records the held-out names; its
``per_keypoint`` rows give the held-out keypoints' own numbers.

Variants: those of locllm_coco.py (``clip``: the CLIP baseline row; ``epochs=N``, ...).
"""

from configs import common

HELD_OUT = ("right elbow", "left wrist", "left knee", "right ankle")


def get_config(arg=None):
  args = common.parse_arg(arg)
  args.setdefault("epochs", "3")
  c = common.coco_config(args)
  c.data.heldout_keypoints = ",".join(HELD_OUT)
  c.data.augment.update(scale_sigma=0.0, rotation_prob=0.0, flip_prob=0.0)
  return c.lock()


def sweep():
  """Table 7's rows: LocLLM and the CLIP baseline."""
  return [("", {}), ("clip", {})]
