"""AP-10K's cross-species protocol (CLAMP, KptLLM's textual prompts): train on one animal
family, test on another. A family is the categories' ``supercategory`` in the AP-10K file.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Sequence, Union

from kptjax.data.sources.base import Records
from kptjax.data.sources.coco import read_coco_keypoints
from kptjax.data.sources.fields import category_table, load_json
from kptjax.errors import DataError

PathLike = Union[str, os.PathLike]
# CLAMP's settings, (train family, test family): different order / same order.
AP10K_DIFFERENT_ORDER = ("Bovidae", "Canidae")
AP10K_SAME_ORDER = ("Canidae", "Felidae")


def family_key(name: str) -> str:
  """A family / supercategory name compared loosely: 'Human Body' -> 'human_body'."""
  return re.sub(r"[\s_-]+", "_", str(name).strip().lower())


def family_category_ids(data: Union[PathLike, Mapping[str, Any]],
                        families: Union[str, Sequence[str]]) -> list[int]:
  """Category ids whose ``supercategory`` (the AP-10K family) is one of ``families``.

  families: a name, a list, or names joined by '|' ('Bovidae|Canidae'); matched
  ignoring case, spaces, '-' and '_' (``family_key``). DataError when a family has no
  category.
  """
  path = "<dict>"
  if not isinstance(data, Mapping):
    path = os.fspath(data)
    data = load_json(path)
  if isinstance(families, str):
    families = [f for f in families.split("|") if f.strip()]
  wanted = {family_key(f): f.strip() for f in families}
  cats = category_table(data, path)
  found: dict[str, list[int]] = {f: [] for f in wanted}
  for cat_id, cat in cats.items():
    family = family_key(cat.get("supercategory", ""))
    if family in found:
      found[family].append(cat_id)
  missing = sorted(wanted[f] for f, ids in found.items() if not ids)
  if missing:
    known = sorted({str(c.get("supercategory", "")) for c in cats.values()})
    raise DataError(path, f"no category of family {missing}", field="categories",
                    expected=f"one of {known}")
  return sorted(i for ids in found.values() for i in ids)


def read_ap10k_families(ann_file: PathLike, image_root: PathLike, *, families: str,
                        spec: str = "ap10k17", dataset: str = "ap10k", min_keypoints: int = 1,
                        check_images: bool = True) -> Records:
  """AP-10K records of the given families only (``families``: 'Canidae', 'Bovidae|...')."""
  ids = family_category_ids(ann_file, families)
  return read_coco_keypoints(ann_file, image_root, spec=spec, dataset=dataset,
                             min_keypoints=min_keypoints, category_ids=ids,
                             check_images=check_images)
