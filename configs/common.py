"""Pieces shared by every config: the logical-axis rules and section defaults.

Each config module composes these; a field lives in exactly one section:
  model        architecture (vit, projector, llm, lora, dtypes, scan/remat)
  checkpoints  Hugging Face dirs to load, tokenizer dir, stage-1 checkpoint
  data         datasets, crop, augmentation, conversation format, sequence length
  optim        optimizer, schedule, trainable mask, gradient accumulation
  train        batch size, steps, logging / checkpoint / eval intervals
  mesh         mesh shape and the logical-axis -> mesh-axis rules
  decode       evaluation-time decoding options
"""

import math

import ml_collections

# Logical axis name -> mesh axis (or None = replicated). One table for the whole project.
LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vit_embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("lora_rank", None),
    ("patch", None),
    ("length", None),
    ("cache_length", None),
)


def vit_config(*, image_size, patch_size, hidden_size, num_layers, num_heads,
               intermediate_size, num_register_tokens=0, pretrained_image_size=None):
  """DINOv2-style ViT fields (names follow transformers.Dinov2Config where they exist);
  CLIP's differences are the patch_bias / pre_layernorm / layerscale / final_layernorm
  flags and hidden_act='quick_gelu'."""
  return ml_collections.ConfigDict(dict(
      image_size=image_size,            # input crop side, pixels
      patch_size=patch_size,
      hidden_size=hidden_size,
      num_layers=num_layers,
      num_heads=num_heads,
      intermediate_size=intermediate_size,
      num_register_tokens=num_register_tokens,
      # Side of the image the position embeddings were trained at (DINOv2: 518);
      # None = image_size. Embeddings are interpolated bicubically to the input grid.
      pretrained_image_size=pretrained_image_size or image_size,
      layerscale_value=1.0,
      layer_norm_eps=1e-6,
      qkv_bias=True,
      use_swiglu_ffn=False,
      hidden_act="gelu",
      feature_layer=-1,                 # which block's output feeds the projector
      pos_embed="learned",              # 'learned' (DINOv2) | 'sincos2d' (fixed)
      # Resize the learned embeddings with torch's antialiased bicubic
      # (Dinov2WithRegistersModel) instead of plain bicubic (Dinov2Model).
      interpolate_antialias=False,
      # CLIP (kptjax/convert/clip.py) sets the next four to the opposite values.
      patch_bias=True,                  # bias on the patch-embedding conv
      pre_layernorm=False,              # LayerNorm on the embeddings (CLIP's pre_layrnorm)
      layerscale=True,                  # per-channel LayerScale (layer_scale1/2) in blocks
      final_layernorm=True,             # LayerNorm on the output tokens ('norm')
  ))


def llm_config(*, vocab_size, hidden_size, intermediate_size, num_layers, num_heads,
               num_kv_heads, head_dim=None, rope_theta=10000.0, rope_scaling=None,
               rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=2048):
  """Llama fields (names follow transformers.LlamaConfig)."""
  return ml_collections.ConfigDict(dict(
      vocab_size=vocab_size,
      hidden_size=hidden_size,
      intermediate_size=intermediate_size,
      num_layers=num_layers,
      num_heads=num_heads,
      num_kv_heads=num_kv_heads,
      head_dim=head_dim or hidden_size // num_heads,
      rope_theta=rope_theta,
      # rope_type 'default' (Llama-2, Vicuna) or 'llama3' (Llama-3.1) with its factors,
      # as in the checkpoint's config.json.
      rope_scaling={**dict(rope_type="default", factor=1.0, low_freq_factor=1.0,
                           high_freq_factor=4.0, original_max_position_embeddings=8192),
                    **(rope_scaling or {})},
      rms_norm_eps=rms_norm_eps,
      tie_word_embeddings=tie_word_embeddings,
      max_position_embeddings=max_position_embeddings,
      # Tokens the tokenizer adds past the checkpoint's table (coord_format 'loc_tokens'):
      # '' = refuse; 'mean' | 'normal' = add trainable rows so (kptjax.convert.vocab).
      new_token_init="",
  ))


def lora_config(rank=8, alpha=16.0, dropout=0.05, vit_targets=("query", "value"),
                llm_targets=("q_proj", "v_proj")):
  """LoRA on named projections of both towers. rank=0 turns LoRA off."""
  return ml_collections.ConfigDict(dict(
      rank=rank, alpha=alpha, dropout=dropout,
      vit_targets=list(vit_targets), llm_targets=list(llm_targets)))


def kpt_config(*, enabled=False, prompt_token_id, keypoint_token_id, extractor_layers=2,
               prompt_extractor="cross_attention", avg_pool_sigma=1.0):
  """KptLLM's support inputs and regression head (kptjax/models/kptllm.py).

  prompt_token_id: the placeholder a support keypoint's prompt token fills;
  keypoint_token_id: ``<keypoint>``, whose last hidden state the FFN head regresses to
  (x, y) (coord_format 'keypoint_token'). enabled: build ``KptLLM`` instead of ``VLM``.
  prompt_extractor: 'cross_attention' (the paper's) | 'avg_pool' (its Table 6 baseline,
  support patches averaged with a Gaussian of ``avg_pool_sigma`` patches).
  """
  return ml_collections.ConfigDict(dict(
      enabled=enabled, prompt_token_id=prompt_token_id, keypoint_token_id=keypoint_token_id,
      extractor_layers=extractor_layers, prompt_extractor=prompt_extractor,
      avg_pool_sigma=avg_pool_sigma))


def mesh_config(data=-1, fsdp=1, tensor=1):
  return ml_collections.ConfigDict(dict(
      shape=dict(data=data, fsdp=fsdp, tensor=tensor),
      rules=[list(r) if isinstance(r, tuple) else r for r in LOGICAL_AXIS_RULES],
  ))


def parse_arg(arg):
  """'tiny,res=112' -> {'tiny': True, 'res': '112'}."""
  out = {}
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    if "=" in part:
      k, v = part.split("=", 1)
      out[k.strip()] = v.strip()
    else:
      out[part] = True
  return out


def steps_for(epochs: float, num_examples: int, batch_size: int) -> int:
  """Optimizer steps of ``epochs`` passes over ``num_examples`` at ``batch_size``."""
  return int(math.ceil(epochs * math.ceil(num_examples / batch_size)))


COCO_TRAIN_PERSONS = 149_813     # COCO train2017 person instances with >= 1 labeled keypoint
MP100_TRAIN_INSTANCES = 14_000   # about 70% of MP-100's ~20k instances (70 train categories)

# Llama-2 tokenizer (Vicuna, LLaVA-1.5): '<unk>' fills the image slots; KptLLM's prompt
# slot and <keypoint> are the byte tokens <0x00>, <0x01> (never in text, so no
# vocabulary resize).
LLAMA2_IMAGE_TOKEN_ID = 0
LLAMA2_KPT_TOKENS = dict(prompt_token_id=3, keypoint_token_id=4)


# Data fields of the papers' protocols (defaults = off), shared with configs/tiny.py.
PROTOCOL_DATA_FIELDS = dict(
    heldout_keypoints="",        # names never asked in training (LocLLM Table 7)
    identify_then_detect=True,   # KptLLM's visual answers name the keypoint first (Table 5)
    rounds_mode="fixed",         # 'dynamic': rounds_min..rounds_max per item and epoch
    rounds_min=1,
    rounds_max=0,                # 0 = all labeled keypoints
    depth_optional=False,        # decimal3d: 2D answers for persons without 3D joints
)


def dinov2_vit_l14(image_size=224):
  """DINOv2 ViT-L/14 (position embeddings trained at 518 px, resized to the input)."""
  return vit_config(image_size=image_size, patch_size=14, hidden_size=1024, num_layers=24,
                    num_heads=16, intermediate_size=4096, pretrained_image_size=518)


def clip_vit_l14_336(image_size=336):
  """CLIP ViT-L/14-336 as LLaVA-1.5 uses it (what kptjax.convert.clip returns for it);
  ``image_size=224`` is CLIP ViT-L/14 (LocLLM's CLIP baseline: 16 x 16 tokens)."""
  vit = vit_config(image_size=image_size, patch_size=14, hidden_size=1024, num_layers=24,
                   num_heads=16, intermediate_size=4096)
  vit.hidden_act = "quick_gelu"
  vit.layer_norm_eps = 1e-5
  vit.patch_bias = False
  vit.pre_layernorm = True
  vit.layerscale = False
  vit.final_layernorm = False      # LLaVA: raw block output, no post_layernorm
  vit.feature_layer = -2           # LLaVA: the penultimate layer's patch tokens
  return vit


def vicuna_7b():
  """Vicuna-7B v1.5 (Llama-2 architecture); load_vlm takes the numbers from config.json."""
  return llm_config(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                    num_layers=32, num_heads=32, num_kv_heads=32, rms_norm_eps=1e-5,
                    max_position_embeddings=4096)


def llama31_8b():
  """Llama-3.1-8B: GQA with 8 kv heads, RoPE theta 500000 with llama3 scaling."""
  return llm_config(
      vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
      num_heads=32, num_kv_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5,
      rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                        high_freq_factor=4.0, original_max_position_embeddings=8192),
      max_position_embeddings=131072)


def dataset(source, path, split, **fields):
  """One ``data.train`` / ``data.eval`` entry: every reader field, ``fields`` overriding."""
  return {**dict(source=source, preset="", path=path, split=split, det_file="",
                 det_score_threshold=0.0, num_images=0, seed=0, knobs="", ann_file="",
                 image_root="", options=""), **fields}


def mp100_sets(split):
  """(train, eval) entries of MP-100 split ``split`` (1..5) under data/mp100."""
  return tuple(dataset("mp100", "data/mp100", f"mp100_split{split}_{name}")
               for name in ("train", "test"))


def paper_config(args, *, vit, llm, lora, projector, image_token_id, kpt, checkpoints,
                 train_set, eval_set, batch, epochs, num_examples):
  """The 7B recipe every paper config starts from (unlocked; LocLLM's public numbers:
  AdamW 5e-4, weight decay 0.05, 3% warmup, cosine, bf16 towers, chunked loss), with the
  towers, checkpoint dirs and datasets given.

  Args:
    args: ``parse_arg`` of the config arg (reads ``accum`` and ``runlocal``).
    vit, llm, lora, kpt: sections (``vit_config`` ...); projector: its kind.
    image_token_id: the token that fills the image slots.
    checkpoints: ``llm_dir``, ``vit_dir``, ``tokenizer_dir``.
    train_set, eval_set: ``dataset(...)`` entries.
    batch: global batch size; epochs, num_examples: -> ``train.num_steps``.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(
      vit=vit, projector=dict(kind=projector), llm=llm, lora=lora,
      image_token_id=image_token_id, kpt=kpt,
      dtype="bfloat16",
      param_dtype="bfloat16",    # frozen towers in bf16; LoRA and projector stay float32
      scan_layers=True,
      remat_policy="nothing_saveable",
      attention="xla",           # jax.nn.dot_product_attention; 'cudnn' on GPUs (flash)
  ))
  c.checkpoints = ml_collections.ConfigDict(dict(
      **checkpoints,
      init_from="",              # stage-1 (projector alignment) kptjax checkpoint, if any
  ))
  c.data = ml_collections.ConfigDict(dict(
      train=train_set, eval=eval_set,
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
      read_thread_priority="normal",   # 'idle': read threads only use idle cores (CPU hosts)
      image_cache_mb=0,          # decoded images kept in memory per process (0: none)
      loc_bins=100,
      group_size=0,
      curriculum="",
      curriculum_augment=False,
      tasks="",
      shots=1,
      strict_images=False,       # True: an unreadable training image stops the run
      **PROTOCOL_DATA_FIELDS,
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
      batch_size=batch, num_steps=steps_for(epochs, num_examples, batch),
      log_every=50, checkpoint_every=2000, keep_checkpoints=3, eval_every=0, stage=2,
      # the output layer + loss 256 positions at a time: f32[B/N,256,V] per device
      # instead of the whole sequence's logits, and only over the chunks that hold
      # answer tokens (kptjax.training.losses.lm_stats)
      loss_chunk=256,
      evaluator="",              # e.g. 'kptjax.evaluate:make_train_evaluator' with eval_every > 0
      # Model fields a resumed run may change (comma-separated, fnmatch patterns, e.g.
      # 'model.remat_policy,model.lora.dropout'); any other difference from the workdir's
      # model_config.json stops the run (kptjax.training.preflight). optim.* / train.* are not
      # model fields: they may always change.
      resume_may_change="",
  ))
  c.mesh = mesh_config(data=-1, fsdp=1, tensor=1)
  c.decode = ml_collections.ConfigDict(dict(
      max_new_tokens=13,         # '[0.xxx,0.yyy]' is 13 Llama tokens
      constrained=False, share_prefix=True, batch_persons=8,
      eval_persons=0,            # periodic eval during training: first N persons (0 = all)
      mpii_box_pck=False,        # MPII without head boxes: box PCK only (else an error)
  ))
  if args.get("runlocal"):       # a smoke run of the full-size model: 4 steps of batch 2
    c.train.batch_size, c.train.num_steps = 2, 4
    c.train.log_every, c.train.checkpoint_every = 1, 4
    c.data.num_workers = 0
  return c


def coco_config(args):
  """LocLLM's COCO recipe (configs/locllm_coco.py's docstring); unlocked. Reads ``epochs``
  (12), ``batch`` (64) and ``mlp`` (PoseLLM's 'mlp2x_gelu' projector, else 'linear')."""
  batch = int(args.get("batch", 64))
  projector = "mlp2x_gelu" if args.get("mlp") else "linear"
  clip = bool(args.get("clip"))    # LocLLM's CLIP baseline: CLIP ViT-L/14 at 224 px
  c = paper_config(
      args, vit=clip_vit_l14_336(image_size=224) if clip else dinov2_vit_l14(), llm=vicuna_7b(),
      lora=lora_config(rank=8, alpha=16.0, dropout=0.05, vit_targets=("query", "value"),
                       llm_targets=("q_proj", "v_proj")),
      projector=projector, image_token_id=LLAMA2_IMAGE_TOKEN_ID,
      kpt=kpt_config(**LLAMA2_KPT_TOKENS),       # off for LocLLM
      checkpoints=dict(llm_dir="checkpoints/vicuna-7b-v1.5",
                       vit_dir="checkpoints/clip-vit-large-patch14" if clip
                       else "checkpoints/dinov2-large",
                       tokenizer_dir="checkpoints/vicuna-7b-v1.5"),
      # COCO layout under `path`: annotations/person_keypoints_{split}.json, {split}/.
      train_set=dataset("coco", "data/coco", "train2017"),
      eval_set=dataset("coco", "data/coco", "val2017"),   # ground-truth boxes, as the paper
      batch=batch, epochs=float(args.get("epochs", 12)), num_examples=COCO_TRAIN_PERSONS)
  return c


def kptllm_config(args, *, train_set, eval_set, batch, epochs, num_examples):
  """KptLLM's model and recipe (LLaVA-1.5-7B base, ``<keypoint>`` regression, 2 x L1 +
  LM; configs/kptllm_mp100.py's docstring) on the given datasets; unlocked."""
  c = paper_config(
      args, vit=clip_vit_l14_336(), llm=vicuna_7b(),
      lora=lora_config(rank=128, alpha=256.0, dropout=0.05, vit_targets=(),
                       llm_targets=("q_proj", "k_proj", "v_proj", "o_proj",
                                    "gate_proj", "up_proj", "down_proj")),
      projector="mlp2x_gelu",     # LLaVA-1.5's connector
      image_token_id=LLAMA2_IMAGE_TOKEN_ID, kpt=kpt_config(enabled=True, **LLAMA2_KPT_TOKENS),
      checkpoints=dict(llm_dir="checkpoints/llava-v1.5-7b",
                       vit_dir="checkpoints/clip-vit-large-patch14-336",
                       tokenizer_dir="checkpoints/llava-v1.5-7b"),
      train_set=train_set, eval_set=eval_set, batch=batch, epochs=epochs,
      num_examples=num_examples)
  c.data.coord_format = "keypoint_token"
  c.optim.lr, c.optim.weight_decay = 2e-4, 0.0
  c.optim.trainable = "lora+vit+projector"
  c.optim.l1_weight = 2.0
  return c


def locllm_ablations(base="epochs=3"):
  """LocLLM's ablations (Tables 4-7; 3 epochs each), as (config arg, {field: value})."""
  return [
      (base, {}),
      (base + ",mlp", {}),                                         # PoseLLM projector
      (base, {"data.use_descriptions": False}),                    # names only
      (base, {"data.rounds": 1}),                                  # single-round
      (base, {"data.coord_format": "loc_tokens",                   # location tokens
              "model.llm.new_token_init": "mean"}),
      (base, {"model.lora.rank": 0, "optim.trainable": "projector"}),   # no LoRA
      (base, {"model.lora.vit_targets": []}),                      # LoRA in the LLM only
      (base, {"model.lora.llm_targets": []}),                      # LoRA in the ViT only
      (base, {"model.lora.rank": 16, "model.lora.alpha": 32.0}),
      (base, {"model.lora.llm_targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}),
  ]
