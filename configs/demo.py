"""The CPU demo: a small LocLLM trained from scratch on synthetic people in minutes.

``python -m kptjax.demo`` runs it (generate data, train, evaluate against the no-image
mean-position baseline, draw overlays). Same method as the papers (ViT patch tokens ->
linear projector -> Llama decoder answering ``[0.412,0.733]`` as text, cross-entropy on
the answer tokens), at toy width (128, 4 + 4 layers, 1.5 M params), with the levers
measured on 2 CPU cores (README, "What the demo does and what it reaches"):

* the synthetic ``easy`` preset with one person per image and large per-joint colour
  markers (radius 0.09 of the figure's height), so every keypoint name maps to something
  visible; rotation +-60 deg keeps the no-image baseline low (PCK@0.1 ~0.18);
* 48 px crops in 8 px patches (36 image tokens) with fixed 2-D sin-cos patch positions
  (location from step 0); ``model.init='fan_in'`` (unit-scale init: with the Hugging Face
  0.02 init at width 128 attention starts flat) and RoPE theta 1e6 (more slowly rotating
  dimensions for content lookups over the sequence);
* the ``compact`` template (``left wrist?[0.412,0.733]</s>``), 4 random keypoints per
  crop (LocLLM uses 5; with all 17 the later rounds are predictable from the earlier
  answers, which single-question decoding never sees);
* a cheap step: MLP width 2 x 128 in both towers and unrolled LLM blocks (at width 128
  on a CPU the scan's per-layer slicing and stacking of residuals costs ~1/6 of the
  step), run data-parallel on 2 CPU devices (``kptjax.demo.DEMO_CPU_DEVICES``), the input
  pipeline's read threads at idle CPU priority (``data.read_thread_priority``: they crop
  while the step's threads wait at the all-reduce instead of taking a core from them);
* AdamW 2e-3, warmup-stable-decay (the last 40% of steps decay to 0), 1,450 steps of
  batch 32 (no flip: the markers are chiral); the first 500 steps read only the first 64
  images (``data.curriculum='64:500'``, augmented).

Variants (``--config configs/demo.py:ARG``, comma separated):
  long     3x the data, 6,000 steps, MLP 4 x 128, scanned blocks, 20% decay: 53 minutes
           on 2 cores, PCK@0.1 0.91.
  smoke    a minute-long run of the whole job (tests, notebooks).
  overfit=N  train on N images without augmentation for 800 steps and evaluate on the
           same people (MLP 4 x 128, scanned blocks): the check that the image reaches the answer
           (N=64: PCK@0.1 0.97).
  cur=N:S[;N:S]  the curriculum stages (``data.curriculum``); ``cur=`` turns it off.
  width=D,layers=L,ffn=M,scan=0|1,image=S,patch=P,rounds=R,batch=B,steps=S,lr=X,theta=T
           the model width, depth and MLP width (M x D) of both towers, whether the LLM
           blocks are scanned, crop and patch side, rounds per crop, run length, learning
           rate, RoPE theta. ``ffn=4,scan=1,steps=2100,decay=0.2`` is the earlier default.
  decay=F  the share of the steps in the schedule's final decay to 0 (``optim.decay_ratio``).
  knobs=a=1;b=2  synthetic knobs of both sets (``kptjax.data.synthetic.Knobs``).
An arg not named here, a number that does not parse or a value-taking arg without one is a
ConfigError that names it (``parse_demo_arg``).
"""

import ml_collections

from configs import common, tiny
from kptjax.errors import ConfigError


# The args get_config reads, by kind (the module docstring): a name it does not know, or a
# value that does not parse, is a ConfigError naming it, never silently the default.
FLAG_ARGS = ("long", "smoke")
NUMBER_ARGS = {"width": int, "layers": int, "ffn": int, "scan": int, "image": int, "patch": int,
               "rounds": int, "batch": int, "steps": int, "overfit": int, "lr": float,
               "theta": float, "decay": float}
TEXT_ARGS = ("cur", "knobs")


def parse_demo_arg(arg):
  """'steps=100,smoke' -> {'steps': 100, 'smoke': True} (numbers parsed by NUMBER_ARGS)."""
  args = common.parse_arg(arg)
  known = (*FLAG_ARGS, *NUMBER_ARGS, *TEXT_ARGS)
  for key, value in args.items():
    if key not in known:
      raise ConfigError(f"configs/demo.py:{arg}: unknown arg {key!r} (known: "
                        f"{', '.join(known)})")
    if key not in FLAG_ARGS and value is True:
      raise ConfigError(f"configs/demo.py:{arg}: {key} needs a value ({key}=...)")
    if key in NUMBER_ARGS:
      kind = NUMBER_ARGS[key]
      try:
        args[key] = kind(value)
      except (TypeError, ValueError):
        raise ConfigError(f"configs/demo.py:{arg}: {key}={value!r} is not "
                          f"{'an integer' if kind is int else 'a number'}") from None
  return args


def get_config(arg=None):
  args = parse_demo_arg(arg)
  c = tiny.get_config().unlock()

  d = args.get("width", 128)
  layers = args.get("layers", 4)
  # long and overfit=N keep the model they were measured with (README)
  measured_wide = bool(args.get("long") or args.get("overfit"))
  ffn = args.get("ffn", 4 if measured_wide else 2) * d
  c.model.vit = common.vit_config(image_size=args.get("image", 48),
                                  patch_size=args.get("patch", 8), hidden_size=d, num_layers=layers,
                                  num_heads=4, intermediate_size=ffn)
  c.model.vit.pos_embed = "sincos2d"
  c.model.llm = common.llm_config(vocab_size=512, hidden_size=d, intermediate_size=ffn,
                                  num_layers=layers, num_heads=4, num_kv_heads=4,
                                  max_position_embeddings=512,
                                  rope_theta=float(args.get("theta", 1e6)))
  c.model.projector.kind = "linear"
  c.model.init = "fan_in"    # from scratch at width 128: unit-scale init (vlm.rescale_init)
  c.model.remat_policy = "none"
  c.model.scan_layers = bool(args.get("scan", measured_wide))

  knobs = args.get("knobs", "people=1:1,marker_size=0.09,occluder_prob=0.0").replace(";", ",")
  c.data.train.update(num_images=4000, knobs=knobs, seed=0)
  c.data.eval.update(num_images=200, knobs=knobs, seed=1)
  c.data.padding = 1.25
  c.data.augment.update(flip_prob=0.0, rotation=30.0, rotation_prob=0.5, scale_sigma=0.15,
                        scale_min=0.85, scale_max=1.15)
  c.data.template = "compact"
  c.data.use_descriptions = False
  c.data.rounds = args.get("rounds", 4)
  num_image_tokens = (c.model.vit.image_size // c.model.vit.patch_size) ** 2
  # <s> + image + rounds of 'right shoulder?[0.412,0.733]</s>' (16 tokens each with the
  # bundled tokenizer, plus one spare; a round that does not fit is dropped whole)
  c.data.max_len = -(-(1 + num_image_tokens + 17 * c.data.rounds) // 16) * 16
  c.data.num_workers = 0
  c.data.read_threads = 2
  c.data.read_thread_priority = "idle"   # the step uses both cores (thread_priority)
  c.data.image_cache_mb = 256   # the 4,000 decoded 128 px images are ~200 MB

  c.optim.update(lr=2e-3, warmup_ratio=0.03, schedule="wsd",
                 decay_ratio=0.2 if measured_wide else 0.4, weight_decay=0.01, trainable="all")

  c.train.update(batch_size=32, num_steps=1450, log_every=25, checkpoint_every=400,
                 keep_checkpoints=1)
  c.decode.update(max_new_tokens=14, batch_persons=50)

  c.data.curriculum = args.get("cur", "64:500").replace(";", ",")
  c.data.curriculum_augment = True
  if args.get("long"):
    c.data.train.num_images = 12000
    c.train.num_steps = 6000
    c.train.checkpoint_every = 1000
  if args.get("overfit"):
    c.data.train.num_images = args["overfit"]
    c.data.eval = ml_collections.ConfigDict(c.data.train.to_dict())
    c.data.augment.update(rotation=0.0, rotation_prob=0.0, scale_sigma=0.0, scale_min=1.0,
                          scale_max=1.0)
    c.train.update(num_steps=800, checkpoint_every=800)
    c.data.curriculum = ""
  for key, field in (("batch", "batch_size"), ("steps", "num_steps")):
    if key in args:
      c.train[field] = args[key]
  c.train.checkpoint_every = min(c.train.checkpoint_every, c.train.num_steps)
  if "lr" in args:
    c.optim.lr = args["lr"]
  if "decay" in args:
    c.optim.decay_ratio = args["decay"]
  if args.get("smoke"):
    c.data.train.num_images, c.data.eval.num_images = 32, 8
    c.train.update(batch_size=8, num_steps=4, log_every=2, checkpoint_every=4)
    c.decode.batch_persons = 8
  return c.lock()
