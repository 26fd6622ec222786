"""LocLLM on Human3.6M (CVPR 2024, Table 5): 3D keypoints, trained on H36M + MPII.

The paper: "we follow RLE to train model on mixed Human3.6M and MPII"; subjects S1, S5,
S6, S7, S8 train and S9, S11 test ("standard protocols"); batch 64, weight decay 0.05,
lr 5e-4 after 10k warmup steps; MPJPE. The answer is ``decimal3d``:
``[x,y,z]`` with z = (z_cam - z_root) / 2000 + 0.5 (4 rounds per person for 3D data, as
the public code). MPII persons have no depth: they are answered in ``decimal2d``
(``data.depth_optional``).

Not stated by the paper, so ours (and in ``sweep()``): the frame strides of the common
protocol (RLE / Integral regression: every 5th frame for training, every 64th for
testing), the 1:1 mixing weights (half of each batch 2D, as Integral regression), the
number of epochs (12, as the 2D model; one epoch = ``H36M_TRAIN_FRAMES`` items).

Model and recipe otherwise as ``configs/locllm_coco.py`` (both built by
``configs.common.coco_config``: DINOv2 ViT-L/14 at 224, linear projector, Vicuna-7B, LoRA
r=8 on q/v), the COCO datasets replaced.

Files (mmpose's layout, ``sources.catalog``): ``data/h36m/annotation_body3d/fps50/
h36m_{train,test}.npz`` + ``data/h36m/images/``; MPII as mmpose's json
``data/mpii/annotations/mpii_train.json`` + ``data/mpii/images/``.

Variants (``--config configs/locllm_h36m.py:ARG``, comma separated): those of
locllm_coco.py (``epochs=N``, ``batch=N``, ``accum=N``, ``mlp``, ``runlocal``) and
  train_stride=N   H36M training frame stride (default 5).
  test_stride=N    H36M test frame stride (default 64).
  h36m_only        train on H36M alone (no MPII).
"""

import ml_collections

from configs import common

H36M_TRAIN_SUBJECTS = ("S1", "S5", "S6", "S7", "S8")
H36M_TEST_SUBJECTS = ("S9", "S11")
H36M_TRAIN_FRAMES = 312_188   # S1/5/6/7/8 frames at stride 5 (the RLE / Integral count)
WARMUP_STEPS = 10_000


def h36m_options(subjects, stride):
  """The reader options of the protocol filter: 'subjects=S1|S5,frame_stride=5'."""
  return f"subjects={'|'.join(subjects)},frame_stride={int(stride)}"


def get_config(arg=None):
  args = common.parse_arg(arg)
  c = common.coco_config(args)
  train_stride = int(args.get("train_stride", 5))
  test_stride = int(args.get("test_stride", 64))
  entry = dict(preset="", det_file="", det_score_threshold=0.0, num_images=0, seed=0,
               knobs="", image_root="")
  train = dict(
      h36m=dict(entry, source="h36m", path="data/h36m", split="train", ann_file="",
                options=h36m_options(H36M_TRAIN_SUBJECTS, train_stride), weight=1.0),
      mpii=dict(entry, source="mpii", path="data/mpii", split="train",
                ann_file="data/mpii/annotations/mpii_train.json",
                image_root="data/mpii/images", options="", weight=1.0))
  if args.get("h36m_only"):
    del train["mpii"]
  c.data.train = ml_collections.ConfigDict(train)
  c.data.eval = ml_collections.ConfigDict(dict(
      entry, source="h36m", path="data/h36m", split="test", ann_file="",
      options=h36m_options(H36M_TEST_SUBJECTS, test_stride)))
  c.data.spec = "h36m17"
  c.data.coord_format = "decimal3d"
  c.data.depth_optional = True      # MPII (no 3D joints) answers in decimal2d
  c.data.rounds = 4                 # 4 rounds per person for 3D data (public code)
  c.decode.max_new_tokens = 22      # '[0.xxx,0.yyy,0.zzzzzz]' is 22 Llama tokens

  if not args.get("runlocal"):
    epochs = float(args.get("epochs", 12))
    c.train.num_steps = common.steps_for(epochs, H36M_TRAIN_FRAMES, c.train.batch_size)
  c.optim.warmup_ratio = min(1.0, WARMUP_STEPS / c.train.num_steps)
  return c.lock()


def sweep():
  """The unknowns of the H36M recipe: strides, mixing weights, epochs, MPII or not."""
  return [
      ("", {}),
      ("h36m_only", {}),
      ("", {"data.train.mpii.weight": 0.5}),
      ("train_stride=1", {}),
      ("epochs=3", {}),
  ]
