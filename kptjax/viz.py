"""Pictures: keypoint + skeleton overlays, attention heatmaps over a crop.

Images are uint8[H, W, 3] RGB numpy arrays in and out; ``save_png`` writes them.
"""

from __future__ import annotations

import io
import os
from typing import Optional, Sequence

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw

from kptjax import storage
from kptjax.data.transforms import NORMALIZATION

# Left (blue), right (orange), center (green) — the LocLLM/mmpose convention.
_LEFT, _RIGHT, _CENTER = (51, 153, 255), (255, 128, 0), (0, 200, 0)


def _side_color(name: str) -> tuple[int, int, int]:
  name = name.lower()
  if name.startswith("left") or name.startswith("l_"):
    return _LEFT
  if name.startswith("right") or name.startswith("r_"):
    return _RIGHT
  return _CENTER


def draw_keypoints(image: np.ndarray, keypoints: np.ndarray,
                   skeleton: Sequence[tuple[int, int]] = (),
                   names: Optional[Sequence[str]] = None,
                   scores: Optional[np.ndarray] = None, score_threshold: float = 0.0,
                   box: Optional[Sequence[float]] = None, radius: Optional[int] = None,
                   label: bool = False, missing: Optional[np.ndarray] = None) -> np.ndarray:
  """Keypoints, limbs and (optionally) the person box drawn over ``image``.

  Args:
    image: uint8[H, W, 3].
    keypoints: f32[K, 2+] pixels (x, y, ...).
    skeleton: limb pairs (i, j) of keypoint indices.
    names: K names; colors follow left / right / center, and ``label`` writes them.
    scores: f32[K]; keypoints at or below ``score_threshold`` are not drawn.
    box: x, y, w, h pixels.
    missing: bool[K] keypoints without an answer: not drawn (nor their limbs); with
      ``label`` their names are listed in the top-left corner ("no answer: ...").
  Returns:
    uint8[H, W, 3] a new image.
  """
  img = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).convert("RGB")
  draw = ImageDraw.Draw(img)
  k = len(keypoints)
  names = list(names) if names is not None else [""] * k
  shown = np.ones(k, bool) if scores is None else np.asarray(scores) > score_threshold
  absent = np.zeros(k, bool) if missing is None else np.asarray(missing, bool)
  shown = shown & ~absent
  r = radius or max(2, int(round(min(img.size) / 100)))
  if box is not None:
    x, y, w, h = (float(v) for v in box[:4])
    draw.rectangle([x, y, x + w, y + h], outline=(255, 255, 0), width=max(1, r // 2))
  for i, j in skeleton:
    if i < k and j < k and shown[i] and shown[j]:
      color = _side_color(names[i]) if _side_color(names[i]) == _side_color(names[j]) else _CENTER
      draw.line([tuple(map(float, keypoints[i][:2])), tuple(map(float, keypoints[j][:2]))],
                fill=color, width=max(1, r // 2 + 1))
  for i in range(k):
    if not shown[i]:
      continue
    x, y = float(keypoints[i][0]), float(keypoints[i][1])
    draw.ellipse([x - r, y - r, x + r, y + r], fill=_side_color(names[i]), outline=(0, 0, 0))
    if label and names[i]:
      draw.text((x + r + 1, y - r), names[i], fill=(255, 255, 255))
  if label and absent.any():
    draw.text((2, 2), "no answer: " + ", ".join(names[i] or str(i) for i in np.flatnonzero(absent)),
              fill=(255, 64, 64))
  return np.asarray(img)


def attention_heatmap(attn_over_patches: np.ndarray, grid: tuple[int, int], crop: np.ndarray,
                      alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
  """Attention weights over the image patches as a heatmap blended over the crop.

  Args:
    attn_over_patches: f32[N] attention to each patch token (N = gh * gw, row-major).
    grid: (gh, gw) patch grid.
    crop: uint8[H, W, 3] the crop the patches came from.
    alpha: heatmap opacity.
    cmap: matplotlib colormap name.
  Returns:
    uint8[H, W, 3]; the weights are min-max normalized, then upsampled bilinearly.
  """
  gh, gw = int(grid[0]), int(grid[1])
  a = np.asarray(attn_over_patches, np.float64).reshape(gh, gw)
  a = (a - a.min()) / max(a.max() - a.min(), 1e-12)
  h, w = crop.shape[:2]
  up = Image.fromarray((a * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR)
  color = colormaps[cmap](np.asarray(up, np.float64) / 255.0)[..., :3] * 255.0
  out = (1.0 - alpha) * np.asarray(crop, np.float64)[..., :3] + alpha * color
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def denormalize(image: np.ndarray, kind: str = "clip") -> np.ndarray:
  """Normalized f32[H, W, 3] crop (``transforms.normalize_image``) -> uint8 for display."""
  mean, std = (np.asarray(v, np.float32) for v in NORMALIZATION[kind])
  return np.clip(np.round((image * std + mean) * 255.0), 0, 255).astype(np.uint8)


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
  """Writes uint8[H, W, 3] as PNG (through a temporary file, then renamed)."""
  buffer = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buffer, format="PNG")
  storage.write_atomic(path, buffer.getvalue())
