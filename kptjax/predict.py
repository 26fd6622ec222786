r"""Any image, any keypoints: coordinates as JSON and an overlay PNG.

    python -m kptjax.predict --config configs/tiny.py --checkpoint WORKDIR \
        --image person.jpg [--box 40,10,120,300] [--keypoints 'left wrist,nose'] \
        [--description 'the tip of the nose' --name 'nose tip'] --out out/

Without ``--box`` the whole image is the person box. ``--keypoints`` picks names of the
keypoint spec (``--spec``, default ``config.data.spec``; all of them when neither
``--keypoints`` nor ``--description`` is given). ``--description`` asks for a keypoint
given only by free text (repeat the flag for several; ``--name`` gives them names).

Prints one JSON object to stdout::

    {"image": ..., "box": [x, y, w, h], "person_score": s, "overlay": "out/x_keypoints.png",
     "keypoints": [{"name": ..., "x": px, "y": px, "score": s, "parsed": true,
                    "answer": "[0.412,0.733]"}, ...],
     "missing": [names of the keypoints without an answer]}

A keypoint whose answer does not parse has ``"parsed": false``, ``"x": null, "y": null``,
score 0, and is listed in ``missing`` (and in a warning on stderr); the overlay does not
draw it and names it in its corner instead. Writes the same JSON and the overlay PNG
(skeleton of the spec) into ``--out``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from kptjax import errors, storage, viz, xla_cpu
from kptjax.data import transforms
from kptjax.data.sources import PersonRecord
from kptjax.evaluation import loading
from kptjax.inference import decode
from kptjax.keypoints import get_spec


def parse_box(text: str) -> np.ndarray:
  """'x,y,w,h' (pixels) -> f32[4]."""
  try:
    box = np.array([float(v) for v in text.split(",")], np.float32)
  except ValueError as e:
    raise errors.ConfigError(f"--box must be 'x,y,w,h' numbers, got '{text}'") from e
  if box.shape != (4,) or box[2] <= 0 or box[3] <= 0:
    raise errors.ConfigError(f"--box must be 'x,y,w,h' with w, h > 0, got '{text}'")
  return box


def select_queries(spec: Any, keypoints: Optional[Sequence[str]],
                   descriptions: Optional[Sequence[str]], names: Optional[Sequence[str]],
                   use_descriptions: bool = True) -> tuple[list[str], list[Optional[str]], list[int]]:
  """(names, descriptions, spec index or -1 per query).

  Raises:
    ConfigError: a keypoint name not in the spec (the message lists the known names).
  """
  out_names, out_desc, index = [], [], []
  wanted = [k.strip() for k in keypoints or [] if k.strip()]
  if not wanted and not descriptions:
    wanted = list(spec.names)
  for name in wanted:
    key = name.replace("_", " ").lower()
    matches = [i for i, n in enumerate(spec.names) if n.lower() == key]
    if not matches:
      raise errors.ConfigError(f"unknown keypoint '{name}' for spec '{spec.name}'; known: "
                               f"{', '.join(spec.names)}")
    i = matches[0]
    out_names.append(spec.names[i])
    out_desc.append(spec.descriptions[i] if use_descriptions else None)
    index.append(i)
  descriptions = list(descriptions or [])
  names = list(names or [])
  for j, text in enumerate(descriptions):
    out_names.append(names[j] if j < len(names) else "keypoint")
    out_desc.append(text)
    index.append(-1)
  return out_names, out_desc, index


def predict(config: Any, image_path: str, *, box: Optional[np.ndarray] = None,
            keypoints: Optional[Sequence[str]] = None,
            descriptions: Optional[Sequence[str]] = None, names: Optional[Sequence[str]] = None,
            spec_name: str = "", checkpoint: str = "", out_dir: Optional[str] = None,
            model_params: Optional[tuple[Any, Any]] = None, tokenizer: Any = None
            ) -> dict[str, Any]:
  """Localizes keypoints of one person; returns the JSON-able result (see module doc).

  Raises:
    DataError: the image is missing or unreadable.
    ConfigError: an unknown keypoint name or a malformed box.
  """
  if not os.path.isfile(image_path):
    raise errors.DataError(image_path, "image file not found", field="image")
  image = transforms.load_image(image_path)
  height, width = image.shape[:2]
  spec = get_spec(spec_name or config.data.spec)
  q_names, q_desc, q_index = select_queries(spec, keypoints, descriptions, names,
                                            bool(config.data.use_descriptions))
  box = np.array([0, 0, width, height], np.float32) if box is None else np.asarray(box)
  record = PersonRecord(image_path=image_path, image_size=(width, height), box=box,
                        keypoints=np.zeros((spec.num_keypoints, 3), np.float32), spec=spec.name)
  if model_params is None:
    config, *model_params = loading.load_model(config, checkpoint)
  model, params = model_params
  size = int(config.model.vit.image_size)
  crop = transforms.crop_person(record, image, (size, size), padding=float(config.data.padding),
                                spec=spec)
  crops = transforms.normalize_image(crop["image"], config.data.normalization)[None]
  tokenizer = tokenizer or loading.load_tokenizer(config)
  localizer = decode.Localizer(config, model, params, tokenizer, q_names, q_desc,
                               subject=getattr(spec, "subject", "person"), share_prefix=True)
  loc = localizer(crops, crop["affine_inv"][None])

  missing = loc.missing[0]
  result: dict[str, Any] = {
      "image": os.path.abspath(image_path), "box": [float(v) for v in box],
      "person_score": float(loc.person_scores[0]), "keypoints": [],
      "missing": [n for n, m in zip(q_names, missing) if m]}
  for j, name in enumerate(q_names):
    xy = (None, None) if missing[j] else (float(loc.keypoints[0, j, 0]),
                                          float(loc.keypoints[0, j, 1]))
    item = {"name": name, "x": xy[0], "y": xy[1], "score": float(loc.scores[0, j]),
            "parsed": not missing[j], "answer": loc.texts[0][j]}
    if q_index[j] < 0:
      item["description"] = q_desc[j]
    if loc.depth is not None:
      item["depth_rel_mm"] = None if missing[j] else float(loc.depth[0, j])
    result["keypoints"].append(item)
  if result["missing"]:
    logging.warning("%d of %d keypoints have no answer (unparseable): %s",
                    len(result["missing"]), len(q_names), ", ".join(result["missing"]))

  if out_dir:
    stem = os.path.splitext(os.path.basename(image_path))[0]
    pos = {spec_i: j for j, spec_i in enumerate(q_index) if spec_i >= 0}
    skeleton = [(pos[a], pos[b]) for a, b in spec.skeleton if a in pos and b in pos]
    overlay = viz.draw_keypoints(image, loc.keypoints[0], skeleton, q_names, box=box,
                                 label=True, missing=missing)
    png = os.path.join(out_dir, f"{stem}_keypoints.png")
    viz.save_png(png, overlay)
    result["overlay"] = os.path.abspath(png)
    storage.write_json_atomic(os.path.join(out_dir, f"{stem}_keypoints.json"), result)
  return result


def _define_flags() -> None:
  """CLI flags (defined only when run as a program, so importing this module is free)."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).")
  flags.DEFINE_string("checkpoint", "", "kptjax workdir or checkpoints dir.")
  flags.DEFINE_string("image", None, "Image file.")
  flags.DEFINE_string("box", "", "Person box 'x,y,w,h' in pixels (default: whole image).")
  flags.DEFINE_list("keypoints", [], "Keypoint names of the spec, comma-separated.")
  flags.DEFINE_multi_string("description", [], "Free-text keypoint description.")
  flags.DEFINE_multi_string("name", [], "Names of the --description keypoints.")
  flags.DEFINE_string("spec", "", "Keypoint spec (default: config.data.spec).")
  flags.DEFINE_string("out", None, "Output directory for the PNG and JSON.")
  flags.mark_flags_as_required(["config", "image"])


def main(argv: Sequence[str]) -> None:
  del argv
  xla_cpu.configure()
  f = flags.FLAGS
  try:
    result = predict(f.config, f.image, box=parse_box(f.box) if f.box else None,
                     keypoints=f.keypoints, descriptions=f.description, names=f.name,
                     spec_name=f.spec, checkpoint=f.checkpoint, out_dir=f.out)
  except errors.KptjaxError as e:
    logging.error("%s", e)
    raise SystemExit(f"error: {e}") from None
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
