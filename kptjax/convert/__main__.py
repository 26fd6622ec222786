"""Converts Hugging Face tower checkpoints into one kptjax params file.

    python -m kptjax.convert --llm_dir /ckpt/vicuna-7b-v1.5 --vit_dir /ckpt/dinov2-large \\
        --out /ckpt/locllm_towers.safetensors --image_size 224 --param_dtype bfloat16

The output is a safetensors file with '/'-joined param names (``llm/...``, ``vit/...``, in
the scanned layout unless --noscan_layers) whose metadata holds the converted configs as
JSON (``llm_config``, ``vit_config``); read it with ``kptjax.convert.load_params``.
Either dir may be omitted. LoRA and projector params are not in the file: they are
created fresh when training starts (``kptjax.convert.load_vlm``).
"""

from __future__ import annotations

import json

from absl import app
from absl import flags
from absl import logging

from kptjax import convert
from kptjax.errors import ConfigError
from kptjax.models.lora import count_params

_LLM_DIR = flags.DEFINE_string("llm_dir", "", "Hugging Face Llama checkpoint dir.")
_VIT_DIR = flags.DEFINE_string("vit_dir", "", "Hugging Face DINOv2 or CLIP (vision) checkpoint dir.")
_OUT = flags.DEFINE_string("out", None, "Output .safetensors file.", required=True)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "ViT input side, pixels.")
_PARAM_DTYPE = flags.DEFINE_string("param_dtype", "", "Storage dtype; '' keeps the stored one.")
_SCAN = flags.DEFINE_bool("scan_layers", True, "Stack LLM layers on a leading axis.")


def main(argv):
  del argv
  if not (_LLM_DIR.value or _VIT_DIR.value):
    raise ConfigError("give --llm_dir and/or --vit_dir")
  params, metadata = {}, {}
  dtype = _PARAM_DTYPE.value or None
  if _LLM_DIR.value:
    llm_config, params["llm"] = convert.load_llama(_LLM_DIR.value, param_dtype=dtype,
                                                   scan_layers=_SCAN.value)
    metadata["llm_config"] = json.dumps(llm_config.to_dict())
    logging.info("llm: %s params from %s", f"{count_params(params['llm']):,}", _LLM_DIR.value)
  if _VIT_DIR.value:
    vit_config, params["vit"] = convert.load_vit(_VIT_DIR.value, param_dtype=dtype,
                                                 image_size=_IMAGE_SIZE.value)
    metadata["vit_config"] = json.dumps(vit_config.to_dict())
    logging.info("vit: %s params from %s", f"{count_params(params['vit']):,}", _VIT_DIR.value)
  path = convert.save_params(params, _OUT.value, metadata)
  print(f"wrote {path} ({count_params(params):,} params)")


if __name__ == "__main__":
  app.run(main)
