"""Coordinate answer text: the one writer of what the model answers for a keypoint.

Formats (``config.data.coord_format``), values in normalized crop units:

* ``decimal2d``: ``[{x:.3f},{y:.3f}]`` with x = crop px / crop width (LocLLM).
* ``decimal3d``: ``[{x:.3f},{y:.3f},{z:.6f}]``, z = (z_cam - z_root) / DEPTH_RANGE_MM + 0.5
  (z in millimetres).
* ``loc_tokens``: ``<loc_i><loc_j>`` with i = floor(x * loc_bins) (the paper's location
  token ablation; the bundled tiny tokenizer has ``<loc_0>``..``<loc_99>``, HF
  tokenizers get them from ``load_tokenizer(path, loc_bins=...)``).
* ``keypoint_token``: the ``<keypoint>`` token alone (KptLLM's regression decoding: its
  final hidden state goes through an FFN head to (x, y); ``tasks.kptllm.TaskEncoder`` only).

Values are clipped to [0, 0.999] (and z to [0, 0.999999]) so that they always match
the parser's ``0\\.\\d+`` (``kptjax.inference.parsing``): LocLLM's own ``{:.3f}`` would
write 1.000 for x = 223.9/224.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from kptjax.errors import ConfigError

COORD_FORMATS = ("decimal2d", "decimal3d", "loc_tokens", "keypoint_token")
DEPTH_RANGE_MM = 2000.0   # z text value = (z_cam - z_root) / DEPTH_RANGE_MM + 0.5
DEFAULT_LOC_BINS = 100

_LOC_RE = re.compile(r"<loc_(\d+)>")


def config_value(cfg: Any, name: str, default: Any) -> Any:
  """``cfg[name]`` of a mapping or ``cfg.name`` of a ConfigDict / object, else ``default``."""
  if isinstance(cfg, Mapping):
    return cfg.get(name, default)
  return getattr(cfg, name, default)


def loc_token(i: int) -> str:
  """The text of location token i: ``<loc_i>``."""
  return f"<loc_{i}>"


def depth_value(z_rel_mm: float) -> float:
  """Root-relative depth in mm -> its answer value (0.5 at the root)."""
  return z_rel_mm / DEPTH_RANGE_MM + 0.5


def format_answer(values: Sequence[float], cfg: Any) -> str:
  """Answer text for normalized crop values (x, y) or (x, y, z value).

  Args:
    values: x, y in [0, 1) (crop px / crop side); for decimal3d also the depth value
      ``depth_value(z_cam - z_root)``.
    cfg: config.data (``coord_format``, ``loc_bins``).
  """
  fmt = config_value(cfg, "coord_format", "decimal2d")
  v = np.asarray(values, np.float64)
  if fmt == "decimal2d":
    x, y = np.clip(v[:2], 0.0, 0.999)
    return f"[{x:.3f},{y:.3f}]"
  if fmt == "decimal3d":
    if v.shape[0] < 3:
      raise ConfigError("coord_format 'decimal3d' needs x, y and z values")
    x, y = np.clip(v[:2], 0.0, 0.999)
    z = float(np.clip(v[2], 0.0, 0.999999))
    return f"[{x:.3f},{y:.3f},{z:.6f}]"
  if fmt == "loc_tokens":
    bins = int(config_value(cfg, "loc_bins", DEFAULT_LOC_BINS))
    i, j = np.clip(np.floor(v[:2] * bins), 0, bins - 1).astype(int)
    return loc_token(i) + loc_token(j)
  if fmt == "keypoint_token":
    raise ConfigError("coord_format 'keypoint_token' answers with a token id, not text: "
                      "use kptjax.data.tasks.kptllm.TaskEncoder")
  raise ConfigError(f"unknown coord_format {fmt!r}; known: {COORD_FORMATS}")


def parse_loc_answer(text: str, loc_bins: int = DEFAULT_LOC_BINS) -> Optional[np.ndarray]:
  """float[2] bin centers of the first two ``<loc_i>`` tokens, or None."""
  found = [int(m) for m in _LOC_RE.findall(text)[:2]]
  if len(found) < 2:
    return None
  return (np.asarray(found, np.float32) + 0.5) / loc_bins
