"""KptLLM on AP-10K (NeurIPS 2024, ../shared/papers/003_*.txt Sec. 4.1): textual-prompt
keypoint detection on unseen animal species (CLAMP's protocol): train on one family,
test on another, OKS AP.

  order=different (default): train Bovidae, test Canidae
  order=same:                train Canidae, test Felidae

The model and recipe are kptllm_mp100.py's (LLaVA-1.5-7B base, ``<keypoint>`` regression,
LoRA r=128 alpha=256, lr 2e-4, batch 128); prompts are the detailed keypoint descriptions
of the ap10k17 spec (the ``textual`` task, LocLLM's round wording).

Variants: ``order=same|different``, ``epochs=N``, ``batch=N``, ``accum=N``, ``runlocal``.
AP-10K layout under data/ap10k: annotations/ap10k-{train,test}-split1.json, data/.
"""

from configs import common

# CLAMP's settings: (train family, test family); also kptjax.data.sources.ap10k.
FAMILIES = {"different": ("Bovidae", "Canidae"), "same": ("Canidae", "Felidae")}
TRAIN_INSTANCES = {"different": 1_600, "same": 1_100}   # rough family sizes of AP-10K train


def _family_set(family, split):
  """AP-10K split-1 ``split`` ('train' | 'test') restricted to one family."""
  return common.dataset("ap10k_family", "data/ap10k", f"ap10k-{split}-split1",
                        ann_file=f"data/ap10k/annotations/ap10k-{split}-split1.json",
                        image_root="data/ap10k/data", options=f"families={family}")


def get_config(arg=None):
  args = common.parse_arg(arg)
  order = args.get("order", "different")
  train_family, test_family = FAMILIES[order]
  c = common.kptllm_config(args, train_set=_family_set(train_family, "train"),
                           eval_set=_family_set(test_family, "test"),
                           batch=int(args.get("batch", 128)),
                           epochs=float(args.get("epochs", 10)),
                           num_examples=TRAIN_INSTANCES[order])
  c.data.spec = "ap10k17"
  c.data.tasks = "textual:1"
  c.data.rounds = 5                  # five keypoints per animal and sequence, as LocLLM
  c.data.max_len = 1280              # 576 image tokens + five described rounds
  c.decode.max_new_tokens = 2        # '<keypoint>' and the end of turn
  return c.lock()


def sweep():
  """Both CLAMP settings, and names instead of descriptions."""
  return [("order=different", {}), ("order=same", {}),
          ("order=different", {"data.use_descriptions": False})]
