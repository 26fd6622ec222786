"""Synthetic people written as a COCO keypoint dataset (the embedded default data of kptjax).

The figures are drawn by ``synthetic_figures.render_image`` (17 joints, COCO-17 order and
visibility), from ``np.random.default_rng([seed, crc32(split), image_index])``: image
``i`` is the same whatever ``num_images`` is, and the files are byte-identical for the
same seed.

Markers are chiral: with ``markers=True`` a horizontal flip augmentation turns the left
wrist's marker into the one asked as the right wrist, so train with ``flip_prob=0``.

Layout written by ``generate(out_dir, split=S)``::

    out_dir/annotations/person_keypoints_S.json   COCO keypoints (images, annotations, categories)
    out_dir/annotations/S.manifest.json           what was generated (cache key)
    out_dir/S/000000000001.jpg ...                the images
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import os
import pathlib
from typing import Any, Mapping, Optional, Union

import tqdm
from absl import logging
from PIL import Image

from kptjax import storage
from kptjax.data.synthetic_figures import (VERSION, Knobs, get_knobs,
                                           render_image)
from kptjax.keypoints import get_spec


def _category() -> dict[str, Any]:
  spec = get_spec("coco17")
  return dict(id=1, name="person", supercategory="person",
              keypoints=[n.replace(" ", "_") for n in spec.names],
              skeleton=[[a + 1, b + 1] for a, b in spec.skeleton])


def _manifest(preset: str, knobs: Knobs, num_images: int, seed: int, split: str) -> dict:
  return dict(version=VERSION, preset=preset, knobs=dataclasses.asdict(knobs),
              num_images=int(num_images), seed=int(seed), split=split)


def generate(out_dir: Union[str, os.PathLike], *, preset: str = "easy", num_images: int,
             seed: int = 0, split: str = "train",
             overrides: Union[str, Mapping[str, Any], None] = None,
             progress: bool = False) -> str:
  """Writes a synthetic COCO keypoint dataset; returns the annotation json path.

  Cached: when ``out_dir/annotations/{split}.manifest.json`` matches the request and the
  json exists, nothing is drawn. Deterministic: same arguments -> same bytes.

  Args:
    out_dir: dataset directory (see the module docstring for the layout).
    preset: a name in ``PRESETS``.
    num_images: number of images to draw.
    seed: dataset seed; the split name is mixed in, so splits never share images.
    split: split name ('train', 'val', ...).
    overrides: knob overrides (``get_knobs``).
    progress: show a tqdm bar.
  """
  knobs = get_knobs(preset, overrides)
  out = pathlib.Path(out_dir)
  ann_dir, img_dir = out / "annotations", out / split
  ann_file = ann_dir / f"person_keypoints_{split}.json"
  manifest_file = ann_dir / f"{split}.manifest.json"
  manifest = _manifest(preset, knobs, num_images, seed, split)
  if ann_file.exists() and manifest_file.exists():
    try:
      if json.loads(manifest_file.read_text()) == json.loads(json.dumps(manifest)):
        return str(ann_file)
    except json.JSONDecodeError:
      pass
  ann_dir.mkdir(parents=True, exist_ok=True)
  img_dir.mkdir(parents=True, exist_ok=True)
  images, annotations = [], []

  def draw(i: int) -> list[dict]:
    image, people = render_image(seed, split, i, knobs)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=knobs.jpeg_quality,
                                subsampling=0)
    storage.write_atomic(img_dir / f"{i + 1:012d}.jpg", buffer.getvalue())
    return people

  # Each image depends on its index alone, so threads draw them in any order (numpy and
  # PIL release the GIL) and the results are collected in index order.
  with concurrent.futures.ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
    drawn = pool.map(draw, range(num_images))
    if progress:
      drawn = tqdm.tqdm(drawn, total=num_images, desc=f"synthetic {preset}/{split}",
                        unit="img")
    drawn = list(drawn)
  for i, people in enumerate(drawn):
    image_id = i + 1
    file_name = f"{image_id:012d}.jpg"
    images.append(dict(id=image_id, file_name=file_name, width=knobs.image_size,
                       height=knobs.image_size))
    for p in people:
      x, y, w, h = (round(float(v), 2) for v in p["box"])
      kp = p["keypoints"]
      annotations.append(dict(
          id=len(annotations) + 1, image_id=image_id, category_id=1, iscrowd=0,
          bbox=[x, y, w, h], area=round(p["area"], 2),
          segmentation=[[x, y, x + w, y, x + w, y + h, x, y + h]],
          num_keypoints=int((kp[:, 2] > 0).sum()),
          keypoints=[round(float(v), 2) if c < 2 else int(v)
                     for row in kp for c, v in enumerate(row)]))
  data = dict(info=dict(description=f"kptjax synthetic people, preset {preset}",
                        version=VERSION, seed=seed, split=split),
              licenses=[], images=images, annotations=annotations, categories=[_category()])
  storage.write_atomic(ann_file, json.dumps(data, separators=(",", ":")).encode())
  storage.write_atomic(manifest_file, json.dumps(manifest, indent=1, sort_keys=True).encode())
  logging.info("synthetic: wrote %d images, %d people to %s", len(images), len(annotations),
               out)
  return str(ann_file)


def dataset_dir(root: Union[str, os.PathLike], preset: str, seed: int,
                overrides: Union[str, Mapping[str, Any], None] = None,
                num_images: Optional[int] = None) -> pathlib.Path:
  """``root/{preset}-seed{seed}[-{hash of the overridden knobs}][-n{num_images}]``.

  With ``num_images`` in the name, sets of different sizes are cached side by side (the
  demo's 4,000 images survive an ``overfit=64`` run).
  """
  name = f"{preset}-seed{seed}"
  if overrides:
    knobs = dataclasses.asdict(get_knobs(preset, overrides))
    name += "-" + hashlib.sha1(json.dumps(knobs, sort_keys=True).encode()).hexdigest()[:8]
  if num_images is not None:
    name += f"-n{int(num_images)}"
  return pathlib.Path(root).expanduser() / name


def ensure_dataset(root: Union[str, os.PathLike], preset: str = "easy", split: str = "train",
                   num_images: int = 1000, seed: int = 0, *,
                   overrides: Union[str, Mapping[str, Any], None] = None,
                   progress: bool = False) -> tuple[str, str]:
  """Generates (or finds cached) a split under ``dataset_dir(root, ...)``.

  Returns:
    (ann_file, image_root) for ``kptjax.data.sources.read_coco_keypoints``.
  """
  out = dataset_dir(root, preset, seed, overrides, num_images)
  ann_file = generate(out, preset=preset, num_images=num_images, seed=seed, split=split,
                      overrides=overrides, progress=progress)
  return ann_file, str(out / split)


def default_root() -> str:
  """``$KPTJAX_DATA_DIR/synthetic``, else ``~/.cache/kptjax/synthetic``."""
  base = os.environ.get("KPTJAX_DATA_DIR")
  if base:
    return os.path.join(base, "synthetic")
  return os.path.join(os.path.expanduser("~"), ".cache", "kptjax", "synthetic")
