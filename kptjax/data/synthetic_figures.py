"""Synthetic people, the drawing: procedurally drawn 17-joint figures (``synthetic`` writes
them as a COCO keypoint dataset).

Every image holds one or more articulated stick figures in the COCO-17 joint order
(``kptjax.keypoints.get_spec('coco17')``): a torso quad, a head disk, limbs of random
thickness whose colour tells the person's left (warm hues) from the right (cool hues),
optional per-joint markers (a colour per joint type, a disk on the left side, a square
on the right) so that every keypoint name maps to something visible, on a textured
background with clutter and occluders. Geometry is in units of the figure's height
(pelvis at the origin, y down) until it is placed in pixels of the supersampled canvas.

Figures vary in pose (lean, head tilt, arm and leg angles, elbow and knee bends, facing
the camera or turned away), scale, in-plane rotation and position; everything is drawn
from ``np.random.default_rng([seed, crc32(split), image_index])``, so image ``i`` is the
same whatever ``num_images`` is.

Visibility follows COCO: 2 = labeled and visible, 1 = labeled but covered (by another
person drawn later or by an occluder), 0 = unlabeled (outside the image, or the face of
a figure seen from the back), with x = y = 0.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Mapping, Union

import numpy as np
from PIL import Image, ImageDraw

from kptjax.errors import ConfigError

VERSION = 1          # bump when the drawing changes: invalidates cached datasets
NUM_JOINTS = 17      # COCO-17 order: nose, eyes, ears, shoulders, elbows, wrists, hips, knees, ankles

# Marker colour per joint type (RGB); left joints are disks, right joints squares.
MARKER_COLORS = np.array([
    (255, 255, 255),                 # nose
    (255, 235, 0), (255, 235, 0),    # eyes: yellow
    (0, 230, 255), (0, 230, 255),    # ears: cyan
    (235, 0, 0), (235, 0, 0),        # shoulders: red
    (0, 210, 0), (0, 210, 0),        # elbows: green
    (30, 60, 255), (30, 60, 255),    # wrists: blue
    (255, 0, 255), (255, 0, 255),    # hips: magenta
    (255, 140, 0), (255, 140, 0),    # knees: orange
    (20, 20, 20), (20, 20, 20),      # ankles: black
], np.uint8)
# 'per_joint' palette: the right joints' own colours (eyes .. ankles, right side).
_RIGHT_MARKER_COLORS = {
    2: (128, 128, 0), 4: (0, 128, 128), 6: (128, 0, 0), 8: (0, 100, 0), 10: (0, 0, 128),
    12: (128, 0, 128), 14: (140, 70, 0), 16: (128, 128, 128)}
_LEFT = (1, 3, 5, 7, 9, 11, 13, 15)
_FACE = (0, 1, 2)                    # unlabeled when the figure is seen from the back
# Limbs drawn as thick lines: (joint a, joint b, side) with side 0 = left, 1 = right.
_LIMBS = ((11, 13, 0), (13, 15, 0), (12, 14, 1), (14, 16, 1),
          (5, 7, 0), (7, 9, 0), (6, 8, 1), (8, 10, 1))


@dataclasses.dataclass(frozen=True)
class Knobs:
  """How a synthetic dataset looks. Lengths are fractions of the person height h."""

  image_size: int = 128                     # square image side, pixels
  people: tuple[int, int] = (1, 2)          # min, max people per image
  scale: tuple[float, float] = (0.5, 0.8)   # person height h / image size
  rotation: float = 60.0                    # in-plane rotation U(-r, r), degrees
  lean: float = 25.0                        # torso lean U(-l, l), degrees
  back_prob: float = 0.0                    # probability a figure faces away
  thickness: tuple[float, float] = (0.035, 0.065)   # limb width / h
  markers: bool = True                      # per-joint visual markers
  # 'pairs': left and right joints share a colour (disk vs square); 'per_joint': the
  # right joints get a darker colour of their own (_RIGHT_MARKER_COLORS)
  marker_palette: str = "pairs"
  marker_size: float = 0.035                # marker radius / h
  clutter: int = 6                          # background shapes per image
  clutter_saturation: float = 0.3           # max HSV saturation of clutter colours
  distractors: int = 0                      # marker-like saturated blobs per image
  texture: float = 0.5                      # background noise amplitude (0..1)
  occluder_prob: float = 0.1                # per person: probability of an occluder
  occluder_size: tuple[float, float] = (0.15, 0.3)  # occluder side / h
  max_overlap: float = 0.05                 # max IoU between people's boxes
  truncation: bool = False                  # people may leave the image
  jpeg_quality: int = 95
  supersample: int = 2                      # draw at this factor, then downsample


PRESETS: dict[str, Knobs] = {
    # What a small model learns on a CPU in minutes. Rotation +-60 deg and free limb
    # angles keep the mean-position (no-image) baseline at PCK@0.1 ~0.20 (tests/test_synthetic.py).
    "easy": Knobs(),
    # Robustness studies: crowds, truncation, no markers, distractors, occluders.
    "hard": Knobs(image_size=192, people=(1, 4), scale=(0.3, 0.9), rotation=180.0, lean=35.0,
                  back_prob=0.3, markers=False, clutter=20, clutter_saturation=0.9,
                  distractors=12, texture=1.0, occluder_prob=0.5,
                  occluder_size=(0.15, 0.45), max_overlap=0.4, truncation=True),
}


def get_knobs(preset: str = "easy", overrides: Union[str, Mapping[str, Any], None] = None
              ) -> Knobs:
  """A preset's knobs with overrides, e.g. ``'image_size=160,markers=false,people=1:1'``.

  Tuple knobs are written ``a:b`` in override strings.
  """
  if preset not in PRESETS:
    raise ConfigError(f"unknown synthetic preset {preset!r}; known: {sorted(PRESETS)}")
  knobs = PRESETS[preset]
  if not overrides:
    return knobs
  if isinstance(overrides, str):
    overrides = dict(p.split("=", 1) for p in overrides.split(",") if p.strip())
  fields = {f.name: f for f in dataclasses.fields(Knobs)}
  values = {}
  for key, value in overrides.items():
    key = key.strip()
    if key not in fields:
      raise ConfigError(f"unknown synthetic knob {key!r}; known: {sorted(fields)}")
    default = getattr(knobs, key)
    if isinstance(value, str):
      value = value.strip()
      if isinstance(default, bool):
        value = value.lower() in ("1", "true", "yes", "on")
      elif isinstance(default, tuple):
        value = tuple(type(default[0])(v) for v in value.split(":"))
      else:
        value = type(default)(value)
    elif isinstance(default, tuple):
      value = tuple(value)
    values[key] = value
  knobs = dataclasses.replace(knobs, **values)
  if knobs.marker_palette not in ("pairs", "per_joint"):
    raise ConfigError(f"synthetic knob marker_palette={knobs.marker_palette!r}; expected "
                      "'pairs' or 'per_joint'")
  return knobs


# ----------------------------------------------------------------------------------------
# Geometry: one figure in units of its height, pelvis at the origin, y pointing down.
# ----------------------------------------------------------------------------------------

def rotate(points: np.ndarray, deg: float) -> np.ndarray:
  """f64[..., 2] points turned by ``deg`` degrees about the origin (clockwise on screen,
  where y points down)."""
  a = np.deg2rad(deg)
  c, s = np.cos(a), np.sin(a)
  p = np.asarray(points, np.float64)
  return np.stack([c * p[..., 0] - s * p[..., 1], s * p[..., 0] + c * p[..., 1]], axis=-1)


def _sample_pose(rng: np.random.Generator, k: Knobs) -> dict[str, Any]:
  """Joints float[17, 2] of one figure (height ~1), head radius, facing."""
  j = np.zeros((NUM_JOINTS, 2))
  lean = rng.uniform(-k.lean, k.lean)
  up = rotate(np.array([0.0, -1.0]), lean)
  side = np.array([-up[1], up[0]])           # image +x for an upright figure
  back = rng.uniform() < k.back_prob
  facing = -1.0 if back else 1.0             # a figure facing the camera has its left at +x
  size = rng.uniform(0.9, 1.1, size=8)       # per-segment length jitter
  neck = 0.30 * size[0] * up
  sw, hw = 0.11 * rng.uniform(0.8, 1.2), 0.08 * rng.uniform(0.8, 1.2)
  for joint, base, width in ((5, neck - 0.02 * up, sw), (11, np.zeros(2), hw)):
    j[joint] = base + facing * width * side        # left
    j[joint + 1] = base - facing * width * side    # right
  for i, sgn in ((0, 1.0), (1, -1.0)):             # left, right
    out = sgn * facing * side                      # away from the body
    # Arm: upper-arm angle from "down the body" toward outward, then an elbow bend.
    a = np.deg2rad(rng.uniform(-30.0, 170.0))
    upper = np.cos(a) * -up + np.sin(a) * out
    fore = rotate(upper, rng.uniform(-140.0, 140.0))
    j[7 + i] = j[5 + i] + 0.17 * size[1 + i] * upper
    j[9 + i] = j[7 + i] + 0.15 * size[3 + i] * fore
    # Leg: thigh angle toward outward, knee bend.
    c = np.deg2rad(rng.uniform(-25.0, 75.0))
    thigh = np.cos(c) * -up + np.sin(c) * out
    shin = rotate(thigh, rng.uniform(-100.0, 100.0))
    j[13 + i] = j[11 + i] + 0.24 * size[5] * thigh
    j[15 + i] = j[13 + i] + 0.22 * size[6] * shin
  hup = rotate(up, rng.uniform(-30.0, 30.0))
  hside = np.array([-hup[1], hup[0]])
  head_r = 0.065 * size[7]
  head = neck + (0.07 + head_r) * hup
  yaw = rng.uniform(-0.5, 0.5)                  # turns the face sideways
  j[0] = head - 0.15 * head_r * hup + yaw * 0.6 * head_r * hside
  for i, sgn in ((1, 1.0), (2, -1.0)):
    j[i] = head + 0.25 * head_r * hup + (facing * sgn * 0.42 + yaw * 0.5) * head_r * hside
    j[i + 2] = head + facing * sgn * 0.95 * head_r * hside
  return dict(joints=j, head=head, head_r=head_r, back=back)


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
  i = int(h * 6.0) % 6
  f = h * 6.0 - int(h * 6.0)
  p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
  r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
  return int(255 * r), int(255 * g), int(255 * b)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
  x1, y1 = max(a[0], b[0]), max(a[1], b[1])
  x2, y2 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
  inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
  return inter / max(a[2] * a[3] + b[2] * b[3] - inter, 1e-9)


# ----------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------

def _background(rng: np.random.Generator, k: Knobs, side: int) -> Image.Image:
  base = np.array(_hsv_to_rgb(rng.uniform(), rng.uniform(0.05, 0.35), rng.uniform(0.35, 0.75)),
                  np.float32)
  # Low-frequency blotches, mostly in brightness, then fine grain.
  grid = rng.uniform(-1, 1, size=(6, 6, 1)) + 0.3 * rng.uniform(-1, 1, size=(6, 6, 3))
  grid = ((grid * 0.5 + 0.5) * 255).clip(0, 255).astype(np.uint8)
  low = np.asarray(Image.fromarray(grid).resize((side, side), Image.BILINEAR), np.float32)
  fine = rng.normal(0, 8.0, size=(side, side, 1)).astype(np.float32)
  pixels = base + k.texture * ((low - 127.5) * (70.0 / 127.5) + fine)
  img = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(img)
  for _ in range(k.clutter):
    color = _hsv_to_rgb(rng.uniform(), rng.uniform(0, k.clutter_saturation),
                        rng.uniform(0.2, 0.9))
    x, y = rng.uniform(0, side, size=2)
    w, h = rng.uniform(0.05, 0.35, size=2) * side
    kind = rng.integers(3)
    if kind == 0:
      draw.rectangle([x, y, x + w, y + h], fill=color)
    elif kind == 1:
      draw.ellipse([x, y, x + w, y + h], fill=color)
    else:
      draw.line([x, y, x + w * rng.choice([-1, 1]), y + h], fill=color,
                width=max(1, int(rng.uniform(0.005, 0.03) * side)))
  for _ in range(k.distractors):
    color = tuple(int(c) for c in MARKER_COLORS[rng.integers(NUM_JOINTS)])
    x, y = rng.uniform(0, side, size=2)
    r = rng.uniform(0.01, 0.02) * side
    draw.ellipse([x - r, y - r, x + r, y + r], fill=color)
  return img


def _draw_figure(draw: ImageDraw.ImageDraw, mask: ImageDraw.ImageDraw, pid: int,
                 fig: dict[str, Any], rng: np.random.Generator, k: Knobs) -> None:
  """Draws one figure (pixel coordinates in ``fig``) on the image and its id on the mask."""
  j, h = fig["px"], fig["height"]
  width = max(1, int(round(rng.uniform(*k.thickness) * h)))
  warm = _hsv_to_rgb(rng.uniform(-0.05, 0.12) % 1.0, rng.uniform(0.45, 0.8), rng.uniform(0.55, 0.95))
  cool = _hsv_to_rgb(rng.uniform(0.5, 0.68), rng.uniform(0.45, 0.8), rng.uniform(0.55, 0.95))
  body = _hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.25), rng.uniform(0.3, 0.85))
  skin = _hsv_to_rgb(rng.uniform(0.03, 0.1), rng.uniform(0.2, 0.6), rng.uniform(0.4, 0.95))

  def both(fn, *args, fill, **kw):
    getattr(draw, fn)(*args, fill=fill, **kw)
    if "outline" in kw:
      kw["outline"] = pid
    getattr(mask, fn)(*args, fill=pid, **kw)

  torso = [tuple(j[5]), tuple(j[6]), tuple(j[12]), tuple(j[11])]
  both("polygon", torso, fill=body)
  neck = (j[5] + j[6]) / 2
  both("line", [tuple(neck), tuple(fig["head_px"])], fill=body, width=width)
  for a, b, side in _LIMBS:
    color = (warm, cool)[side]
    both("line", [tuple(j[a]), tuple(j[b])], fill=color, width=width)
    for p in (j[a], j[b]):   # round joints
      r = width / 2
      both("ellipse", [p[0] - r, p[1] - r, p[0] + r, p[1] + r], fill=color)
  hx, hy = fig["head_px"]
  r = fig["head_r_px"]
  both("ellipse", [hx - r, hy - r, hx + r, hy + r], fill=skin)
  if not k.markers:
    return
  r = max(k.marker_size * h, 1.5 * k.supersample)
  for i in range(NUM_JOINTS):
    if fig["back"] and i in _FACE:
      continue
    x, y = j[i]
    color = tuple(int(c) for c in MARKER_COLORS[i])
    if k.marker_palette == "per_joint" and i in _RIGHT_MARKER_COLORS:
      color = _RIGHT_MARKER_COLORS[i]
    outline = (0, 0, 0) if sum(color) > 200 else (255, 255, 255)
    rr = r * (0.7 if i < 5 else 1.0)
    box = [x - rr, y - rr, x + rr, y + rr]
    shape = "ellipse" if (i in _LEFT or i == 0) else "rectangle"
    both(shape, box, fill=color, outline=outline, width=max(1, k.supersample // 2))


def _place_people(rng: np.random.Generator, k: Knobs, side: int) -> list[dict[str, Any]]:
  """Samples poses and places them in the (supersampled) image without heavy overlap."""
  count = int(rng.integers(k.people[0], k.people[1] + 1))
  figures, boxes = [], []
  for _ in range(count):
    for _attempt in range(20):
      pose = _sample_pose(rng, k)
      height = rng.uniform(*k.scale) * side
      angle = rng.uniform(-k.rotation, k.rotation)
      pts = np.concatenate([pose["joints"], pose["head"][None]], 0)
      pts = np.stack([rotate(p, angle) for p in pts]) * height
      margin = max(pose["head_r"], k.thickness[1]) * height
      lo, hi = pts.min(0) - margin, pts.max(0) + margin
      if k.truncation:
        offset = rng.uniform(-lo - 0.3 * (hi - lo), side - hi + 0.3 * (hi - lo))
      else:
        if np.any(hi - lo > side):
          continue
        offset = rng.uniform(-lo, side - hi)
      pts = pts + offset
      box = np.concatenate([lo + offset, hi - lo])
      if all(_iou(box, b) <= k.max_overlap for b in boxes):
        boxes.append(box)
        figures.append(dict(px=pts[:NUM_JOINTS], head_px=pts[NUM_JOINTS],
                            head_r_px=pose["head_r"] * height, height=height,
                            back=pose["back"], box=box))
        break
  return figures


def render_image(seed: int, split: str, index: int, knobs: Knobs
                 ) -> tuple[np.ndarray, list[dict[str, Any]]]:
  """Draws image ``index`` of a split.

  Returns:
    (image uint8[S, S, 3], people): per person ``keypoints`` float32[17, 3] (x, y, v in
    pixels, COCO visibility), ``box`` float32[4] xywh pixels clipped to the image, and
    ``area`` (visible pixels of the person).
  """
  k = knobs
  rng = np.random.default_rng([seed, zlib.crc32(split.encode()), index])
  ss = k.supersample
  side = k.image_size * ss
  img = _background(rng, k, side)
  mask_img = Image.new("L", (side, side), 0)
  draw, mask = ImageDraw.Draw(img), ImageDraw.Draw(mask_img)
  figures = _place_people(rng, k, side)
  for pid, fig in enumerate(figures, start=1):
    _draw_figure(draw, mask, pid, fig, rng, k)
  for fig in figures:
    if rng.uniform() >= k.occluder_prob:
      continue
    c = fig["px"][rng.integers(NUM_JOINTS)] + rng.normal(0, 0.05, size=2) * fig["height"]
    w, h = rng.uniform(*k.occluder_size, size=2) * fig["height"] / 2
    color = _hsv_to_rgb(rng.uniform(), rng.uniform(0, 0.6), rng.uniform(0.2, 0.9))
    shape = "rectangle" if rng.uniform() < 0.5 else "ellipse"
    for d, fill in ((draw, color), (mask, 255)):
      getattr(d, shape)([c[0] - w, c[1] - h, c[0] + w, c[1] + h], fill=fill)
  image = np.asarray(img.resize((k.image_size, k.image_size), Image.LANCZOS)
                     if ss > 1 else img)
  ids = np.asarray(mask_img)
  people = []
  for pid, fig in enumerate(figures, start=1):
    kpts = np.zeros((NUM_JOINTS, 3), np.float32)
    for i, (x, y) in enumerate(fig["px"]):
      xi, yi = int(np.floor(x)), int(np.floor(y))
      if not (0 <= xi < side and 0 <= yi < side) or (fig["back"] and i in _FACE):
        continue
      kpts[i] = ((x + 0.5) / ss - 0.5, (y + 0.5) / ss - 0.5, 2 if ids[yi, xi] == pid else 1)
    x0, y0 = np.maximum(fig["box"][:2], 0)
    x1, y1 = np.minimum(fig["box"][:2] + fig["box"][2:], side)
    box = np.array([x0, y0, x1 - x0, y1 - y0], np.float32) / ss
    people.append(dict(keypoints=kpts, box=box,
                       area=float((ids == pid).sum()) / ss ** 2))
  return image, people
