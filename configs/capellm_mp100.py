"""CapeLLM on MP-100 (arXiv 2411.06869): support-free category-agnostic pose estimation.

DINOv2 ViT-L/14 at 224 px -> MLP connector -> Llama-3.1-8B (GQA with 8 kv heads, RoPE
theta 500000 with llama3 scaling), LoRA r=8 on q and v of both towers; query image +
detailed keypoint descriptions only; groups of 4 keypoints per training item; PCK on
MP-100 normalized by max(box w, h).

Not given by the paper summary we have, so taken from LocLLM (configs/locllm_coco.py) and
listed in sweep(): the connector kind, LoRA numbers, optimizer numbers, epochs.

Variants: ``epochs=N``, ``batch=N``, ``accum=N``, ``runlocal`` (as locllm_coco.py),
``split=K`` (MP-100 split 1..5).
"""

from configs import common
from configs import locllm_coco

MP100_TRAIN_INSTANCES = 14_000   # about 70% of MP-100's ~20k instances (70 train categories)


def get_config(arg=None):
  args = common.parse_arg(arg)
  split = int(args.get("split", 1))
  c = locllm_coco.get_config(arg).unlock()
  c.model.projector.kind = "mlp2x_gelu"
  c.model.llm = common.llm_config(
      vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
      num_heads=32, num_kv_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5,
      rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                        high_freq_factor=4.0, original_max_position_embeddings=8192),
      max_position_embeddings=131072)
  c.model.image_token_id = 128002   # <|reserved_special_token_0|> of the Llama-3 tokenizer
  # KptLLM's slots if switched on: <|reserved_special_token_1|>, <|reserved_special_token_2|>.
  c.model.kpt.prompt_token_id, c.model.kpt.keypoint_token_id = 128003, 128005

  c.checkpoints.llm_dir = "checkpoints/Llama-3.1-8B"
  c.checkpoints.tokenizer_dir = "checkpoints/Llama-3.1-8B"
  c.checkpoints.vit_dir = "checkpoints/dinov2-large"

  for part, name in (("train", "train"), ("eval", "test")):
    c.data[part].source = "mp100"
    c.data[part].path = "data/mp100"
    c.data[part].split = f"mp100_split{split}_{name}"
  c.data.spec = "mp100"              # one spec per category, from the annotation file
  c.data.normalization = "imagenet"  # DINOv2's own normalization
  c.data.template = "capellm"
  c.data.group_size = 4              # CapeLLM's groups of 4 keypoints per item
  c.data.rounds = 4

  batch = c.train.batch_size
  epochs = float(args.get("epochs", 12))
  if not args.get("runlocal"):
    c.train.num_steps = locllm_coco.steps_for(epochs, MP100_TRAIN_INSTANCES, batch)
  c.decode.max_new_tokens = 16       # Llama-3 splits '[0.412,0.733]' into about 9 tokens
  return c.lock()


def sweep():
  """The unknowns of the CapeLLM recipe and its five splits."""
  runs = [(f"split={k}", {}) for k in range(1, 6)]
  runs += [("split=1", {"model.projector.kind": "linear"}),
           ("split=1", {"data.rounds": 1}),
           ("split=1", {"data.use_descriptions": False}),
           ("split=1", {"optim.lr": 2e-4})]
  return runs
