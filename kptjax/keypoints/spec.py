"""KeypointSpec: what a body model's keypoints are called, look like and pair with."""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np


@dataclasses.dataclass(frozen=True)
class KeypointSpec:
  """A body model: K keypoints with names, text descriptions and geometry facts.

  Attributes:
    name: spec name ('coco17', 'mpii16', ...).
    names: K keypoint names ('left shoulder', ...), as asked in the question text.
    descriptions: K text descriptions (LocLLM Appendix A style).
    flip_pairs: pairs (i, j) of keypoints swapped by a horizontal flip.
    sigmas: optional float[K] OKS sigmas (COCO-style AP).
    skeleton: pairs (i, j) of keypoints joined by a limb, for drawing.
    subject: the word questions use for the instance ('person', 'animal', an MP-100
      category such as 'chair').
    root_index: index of the root joint (3D data: depths are written relative to it).
    description: one line about the body model.
  """

  name: str
  names: tuple[str, ...]
  descriptions: tuple[str, ...]
  flip_pairs: tuple[tuple[int, int], ...] = ()
  sigmas: Optional[tuple[float, ...]] = None
  skeleton: tuple[tuple[int, int], ...] = ()
  subject: str = "person"
  root_index: Optional[int] = None
  description: str = ""

  @property
  def num_keypoints(self) -> int:
    return len(self.names)

  def flip_permutation(self) -> np.ndarray:
    """int[K]: index map that a horizontal flip applies to the keypoint axis."""
    perm = np.arange(self.num_keypoints)
    for i, j in self.flip_pairs:
      perm[i], perm[j] = j, i
    return perm

  def index(self, name: str) -> int:
    return self.names.index(name)

  def description_of(self, name: str) -> str:
    return self.descriptions[self.index(name)]

  def flip_partner(self, name: str) -> str:
    """The name a horizontal flip swaps ``name`` with (itself when unpaired)."""
    return self.names[int(self.flip_permutation()[self.index(name)])]
