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
for ',' on the command line), ``epochs=N``, ``batch=N``, ``accum=N``, ``runlocal``; the
paper's ablations: ``held_out=S`` (Table 3, cross-supercategory: train without
supercategory S, test on it; files from ``kptjax.data.cape.write_cross_supercategory_files``),
``no_itd`` (Table 5: answers without identify-then-detect), ``avg_pool`` (Table 6:
average-pooled support features in place of the prompt feature extractor),
``prompts=visual+textual`` (Table 7: the support prompt and the description together).
``checkpoints.vit_dir`` is a Hugging Face CLIP dir (CLIPVisionModel / CLIPModel, or a
llava-hf LLaVA dir), loaded by ``kptjax.convert.load_clip_vision`` via ``load_vlm``.
"""

from configs import common

# KptLLM Table 3's held-out supercategories (kptjax.data.cape.KPTLLM_CROSS_SUPERCATEGORIES).
CROSS_SUPERCATEGORIES = ("human_body", "human_face", "vehicle", "furniture")


def get_config(arg=None):
  args = common.parse_arg(arg)
  train_set, eval_set = common.mp100_sets(int(args.get("split", 1)))
  held_out = args.get("held_out", "")    # Table 3: human_body | human_face | vehicle | furniture
  if held_out:                           # files of kptjax.data.cape.write_cross_supercategory_files
    for entry, part in ((train_set, "train"), (eval_set, "test")):
      entry["split"] = f"mp100_cross_{held_out}_{part}"
  c = common.kptllm_config(args, train_set=train_set, eval_set=eval_set,
                           batch=int(args.get("batch", 128)),
                           epochs=float(args.get("epochs", 10)),
                           num_examples=common.MP100_TRAIN_INSTANCES)
  c.data.spec = "mp100"
  c.data.augment.flip_prob = 0.0     # support and query keep their sides
  c.data.tasks = args.get("tasks", "visual:1+semantic:1").replace("+", ",")
  if args.get("prompts") == "visual+textual":     # Table 7: prompt and description together
    c.data.tasks = c.data.tasks.replace("visual:", "visual+textual:")
  c.data.identify_then_detect = not args.get("no_itd")             # Table 5
  if args.get("avg_pool"):                                          # Table 6
    c.model.kpt.prompt_extractor = "avg_pool"
  c.data.shots = int(args.get("shots", 1))
  c.data.rounds = 1
  c.data.max_len = 768               # 576 image tokens + one round
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
  runs += [(f"held_out={s},shots=1", {}) for s in CROSS_SUPERCATEGORIES]
  runs += [("split=1,no_itd", {}), ("split=1,avg_pool", {}), ("split=1,prompts=visual+textual", {})]
  return runs
