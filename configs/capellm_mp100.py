"""CapeLLM on MP-100 (arXiv 2411.06869): support-free category-agnostic pose estimation.

DINOv2 ViT-L/14 at 224 px -> MLP connector -> Llama-3.1-8B (GQA with 8 kv heads, RoPE
theta 500000 with llama3 scaling), LoRA r=8 on q and v of both towers; query image +
detailed keypoint descriptions only (kptjax's own, generated from the category's keypoint
names and skeleton: ``kptjax.data.sources.query_descriptions``; the paper's are not
public); dynamic rounds (1..8 keypoints per item, drawn anew each epoch; the range is
ours); PCK on MP-100 normalized by max(box w, h).

Not given by the paper summary we have, so taken from LocLLM (configs/locllm_coco.py) and
listed in sweep(): the connector kind, LoRA numbers, optimizer numbers, epochs.

Variants: ``epochs=N``, ``batch=N``, ``accum=N``, ``runlocal`` (as locllm_coco.py),
``split=K`` (MP-100 split 1..5), ``fixed`` (fixed groups of 4 keypoints per item, chosen
once at load, in place of dynamic rounds).
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg)
  train_set, eval_set = common.mp100_sets(int(args.get("split", 1)))
  c = common.paper_config(
      args, vit=common.dinov2_vit_l14(), llm=common.llama31_8b(),
      lora=common.lora_config(rank=8, alpha=16.0, dropout=0.05,
                              vit_targets=("query", "value"), llm_targets=("q_proj", "v_proj")),
      projector="mlp2x_gelu",
      image_token_id=128002,    # <|reserved_special_token_0|> of the Llama-3 tokenizer
      # KptLLM's slots if switched on: <|reserved_special_token_1|>, <|reserved_special_token_2|>.
      kpt=common.kpt_config(prompt_token_id=128003, keypoint_token_id=128005),
      checkpoints=dict(llm_dir="checkpoints/Llama-3.1-8B", vit_dir="checkpoints/dinov2-large",
                       tokenizer_dir="checkpoints/Llama-3.1-8B"),
      train_set=train_set, eval_set=eval_set, batch=int(args.get("batch", 64)),
      epochs=float(args.get("epochs", 12)), num_examples=common.MP100_TRAIN_INSTANCES)
  c.data.spec = "mp100"              # one spec per category, from the annotation file
  c.data.normalization = "imagenet"  # DINOv2's own normalization
  c.data.template = "capellm"
  if args.get("fixed"):              # fixed groups of 4 keypoints per item, chosen once
    c.data.group_size = 4
  else:                              # CapeLLM's dynamic rounds: 1..8 per item and epoch
    c.data.rounds_mode, c.data.rounds_min, c.data.rounds_max = "dynamic", 1, 8
  c.data.rounds = 4
  for entry in (c.data.train, c.data.eval):   # kptjax's own query descriptions
    entry["options"] = "descriptions=generated"
  c.decode.max_new_tokens = 16       # Llama-3 splits '[0.412,0.733]' into about 9 tokens
  return c.lock()


def sweep():
  """The unknowns of the CapeLLM recipe and its five splits."""
  runs = [(f"split={k}", {}) for k in range(1, 6)]
  runs += [("split=1,fixed", {}),
           ("split=1", {"model.projector.kind": "linear"}),
           ("split=1", {"data.rounds": 1}),
           ("split=1", {"data.use_descriptions": False}),
           ("split=1", {"optim.lr": 2e-4})]
  return runs
