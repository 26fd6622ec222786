"""PersonRecord: what every dataset reader yields (one annotated person).

Readers never crop or normalize: coordinates are in original-image pixels.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Optional, Sequence

import numpy as np
from absl import logging

from kptjax.keypoints import KeypointSpec, get_spec


@dataclasses.dataclass
class PersonRecord:
  """One person (or animal / object instance) in one image.

  Attributes:
    image_path: path of the image file on disk ('' when ``image_bytes`` is given).
    image_size: (width, height) in pixels.
    box: float32[4] person box ``x, y, w, h`` in pixels.
    keypoints: float32[K, 3] (x, y, visibility 0/1/2) in pixels, or float32[K, 4]
      (x, y, z, visibility) for 3D data, with z in millimetres in camera coordinates.
    spec: name of the KeypointSpec (``kptjax.keypoints.get_spec(name)``).
    image_id: dataset image id (COCO ``image_id``) used to write results back.
    ann_id: dataset annotation id (or running index).
    dataset: short dataset name ('coco', 'mpii', ...).
    score: detection score when the box comes from a detector, else 1.0.
    center: optional float32[2] person center given by the dataset (MPII, H36M), pixels.
    scale: optional person scale given by the dataset (MPII: height / 200 px).
    head_box: optional float32[4] x1, y1, x2, y2 head box for PCKh (MPII).
    camera: optional dict (R, T, f, c, k, p) for 3D data.
    keypoints_3d: optional float32[K, 4] 3D joints (x, y, z in mm, visibility).
    category: optional category name (animals, MP-100 categories).
    image_bytes: optional encoded image instead of a path.
    extra: free-form metadata a reader wants to carry (never read by the model).
  """

  image_path: str
  image_size: tuple[int, int]
  box: np.ndarray
  keypoints: np.ndarray
  spec: str
  image_id: int = 0
  ann_id: int = 0
  dataset: str = ""
  score: float = 1.0
  center: Optional[np.ndarray] = None
  scale: Optional[float] = None
  head_box: Optional[np.ndarray] = None
  camera: Optional[dict[str, Any]] = None
  keypoints_3d: Optional[np.ndarray] = None
  category: Optional[str] = None
  image_bytes: Optional[bytes] = None
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def num_keypoints(self) -> int:
    return int(self.keypoints.shape[0])


@dataclasses.dataclass
class CaptionRecord:
  """One image-caption pair (stage-1 image-text alignment data, LLaVA style).

  Attributes:
    image_path: path of the image file.
    caption: the caption text (the answer turn of a LLaVA conversation).
    id: the entry's id in the source file ('' when it has none).
  """

  image_path: str
  caption: str
  id: str = ""


class Records(list):
  """A list of records that also says what its reader skipped and why.

  Attributes:
    skipped: Counter reason -> number of records skipped ('no_keypoints',
      'zero_area', 'missing_image', 'crowd', 'low_score', ...).
    source: the file the records were read from.
    specs: KeypointSpecs a reader made while reading (MP-100), by name.
  """

  def __init__(self, items=(), *, skipped: Optional[dict[str, int]] = None, source: str = "",
               specs: Optional[dict[str, Any]] = None):
    super().__init__(items)
    self.skipped: collections.Counter = collections.Counter(skipped or {})
    self.source = source
    self.specs: dict[str, Any] = dict(specs or {})

  @property
  def num_skipped(self) -> int:
    return int(sum(self.skipped.values()))

  def log_summary(self, reader: str) -> None:
    """Logs the count of records read and of each skip reason."""
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
    logging.info("%s(%s): %d records; skipped %d (%s)", reader, self.source, len(self),
                 self.num_skipped, reasons)


def specs_of(records: Sequence[Any]) -> dict[str, KeypointSpec]:
  """Spec name -> KeypointSpec of every record: the reader's own (``Records.specs``,
  MP-100) first, else the registry's (``kptjax.keypoints.get_spec``)."""
  specs = dict(getattr(records, "specs", {}) or {})
  for name in {r.spec for r in records}:
    if name not in specs:
      specs[name] = get_spec(name)
  return specs
