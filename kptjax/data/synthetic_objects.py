"""Synthetic non-human categories, written as an MP-100-style file (one keypoint list per
category), so the category-agnostic path (KptLLM, CapeLLM) trains and tests on a CPU.

Categories (``CATEGORIES``; the ``supercategory`` is the family for split experiments):

  quadruped   nose, neck, tail base, tail tip, four paws (left side warm, right side
              cool), drawn as a body ellipse, a head disk, legs and a tail.
  square      a plate with four named corners (top left, top right, bottom right,
              bottom left), rotated at most 30 degrees so the names stay true.
  triangle    a sign with an apex and two base corners.
  kite        a rhombus with top, left, right and bottom tips.

Each corner / joint carries a small marker of its own colour, so every name maps to
something visible. One object per image; drawn from ``np.random.default_rng([seed,
crc32(split), index])``, so image ``i`` is the same whatever ``num_images`` is. The
existing people generator (``synthetic.py``) is untouched.

Layout written by ``generate_objects(out_dir, split=S)``::

    out_dir/annotations/S.json            MP-100-style COCO (read with read_mp100)
    out_dir/annotations/S.manifest.json   what was generated (cache key)
    out_dir/images/S/000000000001.jpg ...
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import zlib
from typing import Any, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw

from kptjax import storage
from kptjax.data.synthetic_figures import rotate
from kptjax.errors import ConfigError

VERSION = 1

# name -> (family, [(keypoint, description, marker RGB)], skeleton as 1-based pairs)
CATEGORIES: dict[str, tuple[str, list[tuple[str, str, tuple[int, int, int]]], list]] = {
    "quadruped": ("animal", [
        ("nose", "The tip of the animal's snout, at the front of the head.", (255, 255, 255)),
        ("neck", "Where the head meets the body.", (255, 235, 0)),
        ("tail base", "Where the tail leaves the back of the body.", (0, 230, 255)),
        ("tail tip", "The free end of the tail.", (20, 20, 20)),
        ("left front paw", "The foot of the front leg on the animal's left.", (235, 0, 0)),
        ("right front paw", "The foot of the front leg on the animal's right.", (30, 60, 255)),
        ("left back paw", "The foot of the hind leg on the animal's left.", (255, 140, 0)),
        ("right back paw", "The foot of the hind leg on the animal's right.", (0, 210, 0)),
    ], [[1, 2], [2, 3], [3, 4], [2, 5], [2, 6], [3, 7], [3, 8]]),
    "square": ("object", [
        ("top left corner", "The upper corner on the left of the plate.", (235, 0, 0)),
        ("top right corner", "The upper corner on the right of the plate.", (0, 210, 0)),
        ("bottom right corner", "The lower corner on the right of the plate.", (30, 60, 255)),
        ("bottom left corner", "The lower corner on the left of the plate.", (255, 235, 0)),
    ], [[1, 2], [2, 3], [3, 4], [4, 1]]),
    "triangle": ("object", [
        ("apex", "The top corner of the sign, opposite its base.", (235, 0, 0)),
        ("left base corner", "The corner on the left end of the base.", (0, 210, 0)),
        ("right base corner", "The corner on the right end of the base.", (30, 60, 255)),
    ], [[1, 2], [2, 3], [3, 1]]),
    "kite": ("object", [
        ("top tip", "The highest tip of the kite.", (235, 0, 0)),
        ("left tip", "The tip on the left side of the kite.", (0, 210, 0)),
        ("right tip", "The tip on the right side of the kite.", (30, 60, 255)),
        ("bottom tip", "The lowest tip of the kite.", (255, 235, 0)),
    ], [[1, 2], [2, 4], [4, 3], [3, 1]]),
}


def _shape_points(name: str, rng: np.random.Generator) -> np.ndarray:
  """Keypoints f32[K, 2] of one object in units of its size, centred near 0."""
  if name == "square":
    w, h = rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0)
    pts = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2
    return rotate(pts, rng.uniform(-30, 30))
  if name == "triangle":
    w, h = rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0)
    pts = np.array([[rng.uniform(-0.2, 0.2) * w, -h / 2], [-w / 2, h / 2], [w / 2, h / 2]])
    return rotate(pts, rng.uniform(-25, 25))
  if name == "kite":
    w, top, bottom = rng.uniform(0.5, 0.8), rng.uniform(0.3, 0.45), rng.uniform(0.5, 0.6)
    pts = np.array([[0, -top], [-w / 2, 0], [w / 2, 0], [0, bottom]])
    return rotate(pts, rng.uniform(-25, 25))
  # quadruped, seen from the side; facing right or left (its left side is then nearer).
  length = rng.uniform(0.55, 0.7)
  face = 1.0 if rng.uniform() < 0.5 else -1.0
  neck = np.array([face * length / 2, -0.1])
  base = np.array([-face * length / 2, -0.1])
  nose = neck + np.array([face * rng.uniform(0.15, 0.25), rng.uniform(-0.2, 0.05)])
  tail = base + np.array([-face * rng.uniform(0.15, 0.25), rng.uniform(-0.25, 0.1)])
  leg = rng.uniform(0.3, 0.4)
  paws = [neck + np.array([rng.uniform(-0.12, 0.12), leg]),
          neck + np.array([rng.uniform(-0.12, 0.12), leg * 0.95]),
          base + np.array([rng.uniform(-0.12, 0.12), leg]),
          base + np.array([rng.uniform(-0.12, 0.12), leg * 0.95])]
  return np.stack([nose, neck, base, tail] + paws)


def render_object(seed: int, split: str, index: int, image_size: int = 96,
                  categories: Sequence[str] = tuple(CATEGORIES)
                  ) -> tuple[np.ndarray, str, np.ndarray, list[float]]:
  """(image u8[S,S,3], category name, keypoints f32[K,3] (x, y px, v=2), box xywh)."""
  rng = np.random.default_rng([seed, zlib.crc32(split.encode()), index])
  name = categories[int(rng.integers(len(categories)))]
  _, points, _ = CATEGORIES[name]
  size = rng.uniform(0.45, 0.75) * image_size
  pts = _shape_points(name, rng) * size
  pts = pts - (pts.min(0) + pts.max(0)) / 2
  margin = 0.1 * image_size
  lo, hi = margin - pts.min(0), image_size - margin - pts.max(0)
  pts = pts + rng.uniform(lo, np.maximum(hi, lo))
  s = 2                                                   # supersampling
  bg = rng.integers(40, 200, 3)
  noise = rng.normal(0, 12, (image_size * s, image_size * s, 1))
  canvas = np.clip(bg[None, None] + noise, 0, 255).astype(np.uint8)
  image = Image.fromarray(canvas)
  draw = ImageDraw.Draw(image)
  colour = tuple(int(v) for v in rng.integers(60, 230, 3))
  big = [tuple(p * s) for p in pts]
  if name == "quadruped":
    width = max(2, int(0.05 * size * s))
    nose, neck, base, tail = big[:4]
    for paw, hip in zip(big[4:], (neck, neck, base, base)):
      draw.line([hip, paw], fill=colour, width=width)
    draw.line([base, tail], fill=colour, width=width)
    cx, cy = (np.asarray(neck) + np.asarray(base)) / 2
    rx, ry = abs(neck[0] - base[0]) / 2 + width, 0.12 * size * s
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=colour)
    r = 0.1 * size * s
    hx, hy = (np.asarray(nose) + np.asarray(neck)) / 2
    draw.ellipse([hx - r, hy - r, hx + r, hy + r], fill=colour)
  else:
    order = [0, 1, 3, 2] if name == "kite" else list(range(len(big)))
    draw.polygon([big[i] for i in order], fill=colour)
  r = max(2.0, 0.045 * size * s)
  for p, (_, _, rgb) in zip(big, points):
    draw.ellipse([p[0] - r, p[1] - r, p[0] + r, p[1] + r], fill=rgb)
  image = image.resize((image_size, image_size), Image.BILINEAR)
  kp = np.concatenate([pts, np.full((len(pts), 1), 2.0)], axis=1).astype(np.float32)
  x0, y0 = np.maximum(pts.min(0) - r / s, 0)
  x1, y1 = np.minimum(pts.max(0) + r / s, image_size - 1)
  return np.asarray(image), name, kp, [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def categories_json(names: Sequence[str] = tuple(CATEGORIES)) -> list[dict[str, Any]]:
  """MP-100 ``categories`` entries (ids 1.. in ``CATEGORIES`` order)."""
  out = []
  for i, name in enumerate(CATEGORIES, start=1):
    if name not in names:
      continue
    family, points, skeleton = CATEGORIES[name]
    out.append(dict(id=i, name=name, supercategory=family,
                    keypoints=[p[0].replace(" ", "_") for p in points],
                    keypoint_descriptions=[p[1] for p in points], skeleton=skeleton))
  return out


def generate_objects(out_dir: Union[str, os.PathLike], *, num_images: int, seed: int = 0,
                     split: str = "train", image_size: int = 96,
                     categories: Optional[Sequence[str]] = None) -> tuple[str, str]:
  """Writes (or finds cached) an MP-100-style split; returns (ann_file, image_root)."""
  names = tuple(categories or CATEGORIES)
  unknown = sorted(set(names) - set(CATEGORIES))
  if unknown:
    raise ConfigError(f"unknown synthetic object categories {unknown}; known: "
                      f"{sorted(CATEGORIES)}")
  out = pathlib.Path(out_dir)
  ann_dir, img_dir = out / "annotations", out / "images"
  ann_file, manifest_file = ann_dir / f"{split}.json", ann_dir / f"{split}.manifest.json"
  manifest = dict(version=VERSION, num_images=int(num_images), seed=int(seed), split=split,
                  image_size=int(image_size), categories=list(names))
  if ann_file.exists() and manifest_file.exists():
    try:
      if json.loads(manifest_file.read_text()) == manifest:
        return str(ann_file), str(img_dir)
    except json.JSONDecodeError:
      pass
  (img_dir / split).mkdir(parents=True, exist_ok=True)
  ann_dir.mkdir(parents=True, exist_ok=True)
  ids = {c["name"]: c["id"] for c in categories_json(names)}
  images, annotations = [], []
  for i in range(num_images):
    image, name, kp, box = render_object(seed, split, i, image_size, names)
    file_name = f"{split}/{i + 1:012d}.jpg"
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    storage.write_atomic(img_dir / file_name, buffer.getvalue())
    images.append(dict(id=i + 1, file_name=file_name, width=image_size, height=image_size))
    annotations.append(dict(
        id=i + 1, image_id=i + 1, category_id=ids[name], iscrowd=0,
        bbox=[round(v, 2) for v in box], area=round(box[2] * box[3], 2),
        num_keypoints=len(kp),
        keypoints=[round(float(v), 2) if c < 2 else int(v)
                   for row in kp for c, v in enumerate(row)]))
  data = dict(info=dict(description="kptjax synthetic objects", version=VERSION, seed=seed,
                        split=split),
              images=images, annotations=annotations, categories=categories_json(names))
  storage.write_atomic(ann_file, json.dumps(data, separators=(",", ":")).encode())
  storage.write_atomic(manifest_file, json.dumps(manifest, indent=1, sort_keys=True).encode())
  return str(ann_file), str(img_dir)



