"""KptLLM on MP-100 (NeurIPS 2024, ../shared/papers/003_*.txt): visual-prompt keypoint
detection (identify-then-detect) and keypoint semantic understanding.

LLaVA-1.5-7B base: CLIP ViT-L/14 at 336 px (24 x 24 = 576 image tokens, penultimate
layer) -> 2-layer GELU MLP -> Vicuna-7B v1.5; support image through the same ViT, prompt
encoder + two cross-attention layers -> one prompt token per support keypoint;
``<keypoint>`` token -> FFN head -> (x, y), loss 2 x L1 + LM. LoRA r=128, alpha=256 on
the LLM; the ViT, projector, prompt modules and head fully trained; AdamW lr 2e-4,
weight decay 0, 8 GPUs x 16 = batch 128, no accumulation. Crops of the ground-truth box.
PCK@0.2 per category, mean over categories, on each of the five splits.

Not given by the paper, so chosen here and listed in sweep(): epochs, warmup/schedule
(LLaVA's 3% / cosine), rounds per item, the LoRA targets (LLaVA's: every linear layer),
the task mix.

Variants: ``split=K`` (1..5), ``shots=N`` (1 or 5), ``tasks=visual:1+semantic:1`` ('+'
for ',' on the command line), ``epochs=N``, ``batch=N``, ``accum=N``, ``runlocal``.
``checkpoints.vit_dir`` is a Hugging Face CLIP dir (CLIPVisionModel / CLIPModel, or a
llava-hf LLaVA dir), loaded by ``kptjax.convert.load_clip_vision`` via ``load_vlm``.
"""

from configs import common
from configs import locllm_coco

MP100_TRAIN_INSTANCES = 14_000   # about 70% of MP-100's ~20k instances (70 train categories)


def get_config(arg=None):
  args = common.parse_arg(arg)
  split = int(args.get("split", 1))
  batch = int(args.get("batch", 128))
  c = locllm_coco.get_config(",".join(filter(None, [arg, f"batch={batch}"]))).unlock()
  m = c.model
  m.vit = common.vit_config(image_size=336, patch_size=14, hidden_size=1024, num_layers=24,
                            num_heads=16, intermediate_size=4096)
  # CLIP ViT-L/14-336 (what kptjax.convert.clip returns for it).
  m.vit.hidden_act = "quick_gelu"
  m.vit.layer_norm_eps = 1e-5
  m.vit.patch_bias = False
  m.vit.pre_layernorm = True
  m.vit.layerscale = False
  m.vit.final_layernorm = False      # LLaVA: raw block output, no post_layernorm
  m.vit.feature_layer = -2           # LLaVA: the penultimate layer's patch tokens
  m.projector.kind = "mlp2x_gelu"    # LLaVA-1.5's connector
  m.lora = common.lora_config(rank=128, alpha=256.0, dropout=0.05, vit_targets=(),
                              llm_targets=("q_proj", "k_proj", "v_proj", "o_proj",
                                           "gate_proj", "up_proj", "down_proj"))
  m.kpt.enabled = True
  c.checkpoints.llm_dir = "checkpoints/llava-v1.5-7b"
  c.checkpoints.tokenizer_dir = "checkpoints/llava-v1.5-7b"
  c.checkpoints.vit_dir = "checkpoints/clip-vit-large-patch14-336"

  for part, name in (("train", "train"), ("eval", "test")):
    c.data[part].source = "mp100"
    c.data[part].path = "data/mp100"
    c.data[part].split = f"mp100_split{split}_{name}"
  c.data.spec = "mp100"
  c.data.normalization = "clip"
  c.data.padding = 1.0               # the ground-truth box, resized to 336
  c.data.augment.flip_prob = 0.0     # support and query keep their sides
  c.data.coord_format = "keypoint_token"
  c.data.tasks = args.get("tasks", "visual:1+semantic:1").replace("+", ",")
  c.data.shots = int(args.get("shots", 1))
  c.data.rounds = 1
  c.data.max_len = 768               # 576 image tokens + one round

  c.optim.lr, c.optim.weight_decay = 2e-4, 0.0
  c.optim.trainable = "lora+vit+projector"
  c.optim.l1_weight = 2.0
  epochs = float(args.get("epochs", 10))
  if not args.get("runlocal"):
    c.train.num_steps = locllm_coco.steps_for(epochs, MP100_TRAIN_INSTANCES, batch)
  c.decode.max_new_tokens = 48       # a description, then <keypoint>
  return c.lock()


def sweep():
  """The five splits, 1- and 5-shot (Table 2), and the unknowns of the recipe."""
  runs = [(f"split={k},shots={s}", {}) for s in (1, 5) for k in range(1, 6)]
  runs += [("split=1", {"data.tasks": "visual:1"}),
           ("split=1", {"data.coord_format": "decimal2d"}),     # LocLLM's text decoding
           ("split=1", {"data.rounds": 4}),
           ("split=1", {"optim.trainable": "lora+projector"}),
           ("split=1", {"model.kpt.extractor_layers": 1})]
  return runs
