"""Which converter reads a Hugging Face checkpoint dir: decided from config.json alone.

``identify(dir, role)`` runs before any tensor is read: it returns the dir's
``model_type`` when the converter for ``role`` ('llm' or 'vit') supports it, and raises a
one-line ``CheckpointError`` naming the dir, the type found and the supported ones
otherwise (a vision tower given as the LLM, or the reverse, is said so).

Supported:
  llm  'llama': Llama, Llama-2, Llama-3.x, Vicuna (kptjax.convert.llama)
  vit  'dinov2', 'dinov2_with_registers' (kptjax.convert.dinov2);
       'clip_vision_model', 'clip', 'llava' with a CLIP vision_config (kptjax.convert.clip)

A config.json without ``model_type`` (written by old tools) is identified by its
``architectures`` entry (``LlamaForCausalLM`` -> 'llama', ``Dinov2Model`` -> 'dinov2', ...).
"""

from __future__ import annotations

import pathlib

from kptjax.errors import CheckpointError

SUPPORTED = {
    "llm": {"llama": "Llama, Llama-2, Llama-3.x, Vicuna"},
    "vit": {"dinov2": "DINOv2", "dinov2_with_registers": "DINOv2 with registers",
            "clip_vision_model": "CLIP vision tower", "clip": "CLIP",
            "llava": "LLaVA (its CLIP vision tower)"},
}
_CONFIG_FIELD = {"llm": "checkpoints.llm_dir", "vit": "checkpoints.vit_dir"}
# architectures[0] prefix -> model_type, for config.json files without model_type.
_ARCHITECTURES = {"Llama": "llama", "Dinov2WithRegisters": "dinov2_with_registers",
                  "Dinov2": "dinov2", "CLIPVision": "clip_vision_model", "CLIP": "clip",
                  "Llava": "llava"}


def supported_text(role: str) -> str:
  """'llama' (Llama, Llama-2, ...) style list of the model types ``role`` reads."""
  return ", ".join(f"'{t}' ({what})" for t, what in SUPPORTED[role].items())


def model_type(hf_config: dict) -> str | None:
  """config.json's ``model_type``, or the one its ``architectures`` entry implies."""
  found = hf_config.get("model_type")
  if found:
    return str(found)
  for arch in hf_config.get("architectures") or ():
    for prefix, mtype in _ARCHITECTURES.items():
      if str(arch).startswith(prefix):
        return mtype
  return None


def identify(ckpt_dir: str | pathlib.Path, hf_config: dict, role: str) -> str:
  """The dir's model type if the ``role`` converter ('llm' | 'vit') reads it.

  Args:
    ckpt_dir: the checkpoint dir (for messages).
    hf_config: its config.json as a dict (``hf_io.read_config``).
    role: 'llm' or 'vit'.

  Raises:
    CheckpointError: the type is missing or not one the converter reads; a LLaVA dir's
      ``vision_config`` must be a CLIP vision tower.
  """
  where = f"{ckpt_dir}/config.json ({_CONFIG_FIELD[role]})"
  found = model_type(hf_config)
  if found is None:
    raise CheckpointError(f"{where}: no model_type (expected one of {supported_text(role)})")
  if found not in SUPPORTED[role]:
    other = next((r for r in SUPPORTED if r != role and found in SUPPORTED[r]), None)
    hint = (f"; it is a {'vision tower' if other == 'vit' else 'language model'}: give it as "
            f"{_CONFIG_FIELD[other]}" if other else "")
    raise CheckpointError(f"{where}: model_type={found!r} is not supported "
                          f"(supported: {supported_text(role)}){hint}")
  if found in ("clip", "llava"):
    vision = hf_config.get("vision_config")
    vision_type = vision.get("model_type", "clip_vision_model") if isinstance(vision, dict) else None
    if vision_type != "clip_vision_model":
      raise CheckpointError(f"{where}: model_type={found!r} with vision_config.model_type="
                            f"{vision_type!r} (expected a 'clip_vision_model' vision_config)")
  return found
