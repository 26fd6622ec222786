"""Tiny model for CPU tests: every part of the real model, at toy width.

Variants (``--config configs/tiny.py:ARG``): ``mlp`` uses the PoseLLM projector,
``lora`` turns on LoRA (rank 4) and trains lora+projector.
"""

import ml_collections

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg)
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict(dict(
      vit=common.vit_config(image_size=32, patch_size=8, hidden_size=32, num_layers=2,
                            num_heads=2, intermediate_size=64),
      projector=dict(kind="mlp2x_gelu" if args.get("mlp") else "linear"),
      # vocab_size of the bundled tiny tokenizer (kptjax/data/assets/tiny_tokenizer.json).
      llm=common.llm_config(vocab_size=512, hidden_size=32, intermediate_size=64,
                            num_layers=2, num_heads=4, num_kv_heads=2,
                            max_position_embeddings=1024),
      lora=common.lora_config(rank=4 if args.get("lora") else 0, alpha=8.0, dropout=0.0),
      image_token_id=4,          # '<image>' of the tiny tokenizer; Llama dirs use 0 ('<unk>')
      # The tiny tokenizer's vocabulary is full: <loc_98> / <loc_99> stand for the prompt
      # slot and <keypoint> (so coord_format 'loc_tokens' with them is refused).
      kpt=common.kpt_config(prompt_token_id=103, keypoint_token_id=104),
      dtype="float32",
      param_dtype="float32",
      scan_layers=True,
      remat_policy="nothing_saveable",   # name in jax.checkpoint_policies, or 'none'
      # 'xla' (jax.nn.dot_product_attention; the CPU path), 'cudnn' (GPU flash kernel),
      # 'einsum' (the explicit einsums; what attention maps are read from), 'recompute',
      # 'folded' (layers.folded_attention: a faster CPU layout, same values)
      attention="xla",
  ))

  c.checkpoints = ml_collections.ConfigDict(dict(
      llm_dir="", vit_dir="", tokenizer_dir="",   # '' = random init / bundled tokenizer
      init_from="",                                # stage-1 kptjax checkpoint dir
  ))

  c.data = ml_collections.ConfigDict(dict(
      # source 'synthetic': num_images of `preset` (+ `knobs` overrides, e.g.
      # 'image_size=160,people=1:1') drawn from `seed` under `path`
      # ('' = $KPTJAX_DATA_DIR/synthetic or ~/.cache/kptjax/synthetic), cached.
      # Other sources: `ann_file` + `image_root`, or the COCO layout under `path`
      # (annotations/person_keypoints_{split}.json, {split}/); `options` = extra reader
      # keywords 'key=value,...' (e.g. 'headbox_file=x.mat').
      train=dict(source="synthetic", preset="easy", path="", split="train",
                 det_file="", det_score_threshold=0.0, num_images=64, seed=0, knobs="",
                 ann_file="", image_root="", options=""),
      eval=dict(source="synthetic", preset="easy", path="", split="val",
                det_file="", det_score_threshold=0.0, num_images=16, seed=0, knobs="",
                ann_file="", image_root="", options=""),
      spec="coco17",
      normalization="clip",              # 'clip' | 'imagenet'
      padding=1.25,                      # box -> crop padding factor
      augment=dict(scale_sigma=0.3, scale_min=0.7, scale_max=1.3,
                   rotation=40.0, rotation_prob=0.5, flip_prob=0.5),
      template="locllm",                 # 'locllm' | 'capellm' | 'chat' | 'compact'
      coord_format="decimal2d",          # 'decimal2d' | 'decimal3d' | 'loc_tokens'
      use_descriptions=True,
      rounds=5,
      max_len=512,
      num_workers=0,                     # grain worker processes (0 = in-process)
      read_threads=2,                    # grain threads per process
      read_thread_priority="normal",     # 'idle': Linux SCHED_IDLE (kptjax.data.thread_priority)
      image_cache_mb=0,                  # >0: decoded images kept in memory (LRU) per process
      loc_bins=100,                      # coord_format 'loc_tokens': <loc_0>..<loc_99>
      group_size=0,                      # >0: CapeLLM's fixed keypoint groups per item
      # warm start on a few items: '64:500' = the first 64 items for 500 steps, then all
      # ('64:300,512:300' adds a middle stage); kptjax.data.pipeline.CurriculumItems
      curriculum="",
      curriculum_augment=False,          # augment the curriculum stages too
      tasks="",                          # KptLLM tasks mixed per item: 'visual:1,textual:1'
      shots=1,                           # support instances per query (visual prompts)
      # a training image that cannot be read: False = skip it, count it (logged as
      # skipped_images), True = stop with its ImageError (python -m kptjax.train --strict)
      strict_images=False,
      **common.PROTOCOL_DATA_FIELDS,     # the papers' protocols, off (configs/common.py)
  ))

  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-3, warmup_ratio=0.03, schedule="cosine", end_lr_ratio=0.0,
      decay_ratio=0.2,                   # schedule 'wsd': the last 20% of steps decay
      weight_decay=0.05, b1=0.9, b2=0.999, clip_norm=1.0, grad_accum_steps=1,
      trainable="lora+projector" if args.get("lora") else "all",
      l1_weight=2.0,                     # KptLLM: loss = l1_weight * L1(<keypoint> xy) + LM
  ))

  c.train = ml_collections.ConfigDict(dict(
      batch_size=4, num_steps=10, log_every=5, checkpoint_every=10, keep_checkpoints=2,
      eval_every=0, stage=2,
      loss_chunk=0,      # output layer + loss on answers, this many at a time (0 = all positions)
      evaluator="",   # 'package.module:factory' -> eval_fn(state, step) every eval_every steps
      # Model fields a resumed run may change (comma-separated, fnmatch patterns, e.g.
      # 'model.remat_policy,model.lora.dropout'); any other difference from the workdir's
      # model_config.json stops the run (kptjax.training.preflight). optim.* / train.* are not
      # model fields: they may always change.
      resume_may_change="",
  ))

  c.mesh = common.mesh_config()

  c.decode = ml_collections.ConfigDict(dict(
      max_new_tokens=16, constrained=False, share_prefix=True, batch_persons=8,
      eval_persons=0,            # periodic eval during training: first N persons (0 = all)
      mpii_box_pck=False,        # MPII without head boxes: box PCK only (else an error)
  ))
  return c.lock()
