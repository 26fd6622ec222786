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
Checkpoint dirs are fields: ``--config.checkpoints.llm_dir=/ckpt/vicuna-7b-v1.5``.
"""

import math

import ml_collections

from configs import common

COCO_TRAIN_PERSONS = 149_813   # COCO train2017 person instances with >= 1 labeled keypoint


def steps_for(epochs: float, num_examples: int, batch_size: int) -> int:
  return int(math.ceil(epochs * math.ceil(num_examples / batch_size)))


def get_config(arg=None):
  args = common.parse_arg(arg)
  batch = int(args.get("batch", 64))
  epochs = float(args.get("epochs", 12))
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict(dict(
      vit=common.vit_config(image_size=224, patch_size=14, hidden_size=1024, num_layers=24,
                            num_heads=16, intermediate_size=4096, pretrained_image_size=518),
      projector=dict(kind="mlp2x_gelu" if args.get("mlp") else "linear"),
      # Vicuna-7B v1.5 (Llama-2 architecture); load_vlm takes the numbers from config.json.
      llm=common.llm_config(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                            num_layers=32, num_heads=32, num_kv_heads=32, rms_norm_eps=1e-5,
                            max_position_embeddings=4096),
      lora=common.lora_config(rank=8, alpha=16.0, dropout=0.05,
                              vit_targets=("query", "value"), llm_targets=("q_proj", "v_proj")),
      image_token_id=0,          # '<unk>' of the Llama tokenizer fills the image slots
      # KptLLM's prompt slot and <keypoint>: Llama-2's byte tokens <0x00>, <0x01> (never
      # in text, so no vocabulary resize); off for LocLLM.
      kpt=common.kpt_config(prompt_token_id=3, keypoint_token_id=4),
      dtype="bfloat16",
      param_dtype="bfloat16",    # frozen towers in bf16; LoRA and projector stay float32
      scan_layers=True,
      remat_policy="nothing_saveable",
      attention="xla",           # jax.nn.dot_product_attention; 'cudnn' on GPUs (flash)
  ))

  c.checkpoints = ml_collections.ConfigDict(dict(
      llm_dir="checkpoints/vicuna-7b-v1.5", vit_dir="checkpoints/dinov2-large",
      tokenizer_dir="checkpoints/vicuna-7b-v1.5",
      init_from="",              # stage-1 (projector alignment) kptjax checkpoint, if any
  ))

  c.data = ml_collections.ConfigDict(dict(
      # COCO layout under `path`: annotations/person_keypoints_{split}.json, {split}/.
      train=dict(source="coco", preset="", path="data/coco", split="train2017",
                 det_file="", det_score_threshold=0.0, num_images=0, seed=0, knobs="",
                 ann_file="", image_root="", options=""),
      eval=dict(source="coco", preset="", path="data/coco", split="val2017",
                det_file="", det_score_threshold=0.0,    # ground-truth boxes, as the paper
                num_images=0, seed=0, knobs="", ann_file="", image_root="", options=""),
      spec="coco17",
      normalization="clip",
      padding=1.0,               # no box padding on COCO (1.25 on MPII)
      augment=dict(scale_sigma=0.3, scale_min=0.7, scale_max=1.3,
                   rotation=40.0, rotation_prob=0.5, flip_prob=0.5),
      template="locllm",
      coord_format="decimal2d",
      use_descriptions=True,
      rounds=5,
      max_len=1024,              # 256 image tokens + 5 rounds of description, question, answer
      num_workers=8,
      read_threads=4,
      loc_bins=100,
      group_size=0,
      curriculum="",
      curriculum_augment=False,
      tasks="",
      shots=1,
      strict_images=False,       # True: an unreadable training image stops the run
  ))

  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=5e-4, warmup_ratio=0.03, schedule="cosine", end_lr_ratio=0.0,
      decay_ratio=0.2,
      weight_decay=0.05, b1=0.9, b2=0.999, clip_norm=1.0,
      grad_accum_steps=int(args.get("accum", 1)),
      trainable="lora+projector",
      l1_weight=2.0,
  ))

  c.train = ml_collections.ConfigDict(dict(
      batch_size=batch, num_steps=steps_for(epochs, COCO_TRAIN_PERSONS, batch),
      log_every=50, checkpoint_every=2000, keep_checkpoints=3, eval_every=0, stage=2,
      # the output layer + loss 256 positions at a time: f32[B/N,256,32000] per device
      # instead of the whole sequence's logits (kptjax.training.step.lm_stats)
      loss_chunk=256,
      evaluator="",              # e.g. 'kptjax.evaluate:make_train_evaluator' with eval_every > 0
      # Model fields a resumed run may change (comma-separated, fnmatch patterns, e.g.
      # 'model.remat_policy,model.lora.dropout'); any other difference from the workdir's
      # model_config.json stops the run (kptjax.training.preflight). optim.* / train.* are not
      # model fields: they may always change.
      resume_may_change="",
  ))

  c.mesh = common.mesh_config(data=-1, fsdp=1, tensor=1)

  c.decode = ml_collections.ConfigDict(dict(
      max_new_tokens=13,         # '[0.xxx,0.yyy]' is 13 Llama tokens
      constrained=False, share_prefix=True, batch_persons=8,
      eval_persons=0,            # periodic eval during training: first N persons (0 = all)
      mpii_box_pck=False,        # MPII without head boxes: box PCK only (else an error)
  ))

  if args.get("runlocal"):
    c.train.batch_size, c.train.num_steps = 2, 4
    c.train.log_every, c.train.checkpoint_every = 1, 4
    c.data.num_workers = 0
  return c.lock()


def sweep():
  """Ablations of the paper (Tables 4-7), as lists of dotted config overrides.

  Each entry: (config arg, {field: value}); the paper's ablations train 3 epochs.
  """
  base = "epochs=3"
  return [
      (base, {}),
      (base + ",mlp", {}),                                         # PoseLLM projector
      (base, {"data.use_descriptions": False}),                    # names only
      (base, {"data.rounds": 1}),                                  # single-round
      (base, {"data.coord_format": "loc_tokens"}),                 # location tokens
      (base, {"model.lora.rank": 0, "optim.trainable": "projector"}),   # no LoRA
      (base, {"model.lora.vit_targets": []}),                      # LoRA in the LLM only
      (base, {"model.lora.llm_targets": []}),                      # LoRA in the ViT only
      (base, {"model.lora.rank": 16, "model.lora.alpha": 32.0}),
      (base, {"model.lora.llm_targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}),
  ]
