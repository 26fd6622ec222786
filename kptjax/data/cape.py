"""Category-agnostic protocols: MP-100 category splits, few-shot supports, AP-10K families.

MP-100 (POMNet's protocol, used by KptLLM and CapeLLM): 100 categories, five splits;
in every split the categories are cut into 70 train / 10 val / 20 test, disjoint, and
the five test sets are disjoint too (each category is a test category exactly once).
``category_splits`` makes such splits from any category list (seeded), and
``write_split_files`` writes them as ``mp100_split{k}_{train,val,test}.json`` (COCO
subsets read by ``read_mp100``; the names ``configs/capellm_mp100.py`` uses).

Cross-supercategory (POMNet's protocol, KptLLM Table 3): for each held-out
supercategory (the categories' ``supercategory`` field; KptLLM holds out human body,
human face, vehicle and furniture, ``KPTLLM_CROSS_SUPERCATEGORIES``), train on every
category of the other supercategories and test on the held-out one's:
``write_cross_supercategory_files`` writes ``mp100_cross_{supercategory}_{train,test}.json``.

Which protocol made a split file (for ``metrics.json``): the writers above record it in
``split_protocol.json`` beside the files; ``split_protocol(ann_file)`` returns
``{'split': 'seeded', 'seed': s, ...}``, ``{'split': 'cross_supercategory',
'held_out': name, ...}``, or ``{'split': 'files', ...}`` for files it did not write
(e.g. the official POMNet split files).

Few-shot supports (KptLLM's visual prompts): every query instance gets ``shots``
support instances of its own category from other images, drawn from
``np.random.default_rng([seed, query index])`` — the same for the same seed, whatever
else is in the list. A keypoint counts for a query when it is labeled in the query
and in at least one support (5-shot: the prompt is the average of the supports where
the keypoint is labeled; ``support_keypoint_mask``).

AP-10K cross-species (CLAMP's protocol, KptLLM's textual prompts): train on one family,
test on another. ``sources.ap10k.family_category_ids`` maps family names (the categories'
``supercategory``) to category ids for ``read_coco_keypoints(category_ids=...)``;
``read_ap10k_families`` reads a file keeping only those families (both live in
``kptjax/data/sources/ap10k.py``; data source ``ap10k_family``).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from kptjax import storage
from kptjax.data.sources.ap10k import family_category_ids, family_key
from kptjax.data.sources.catalog import locate
from kptjax.data.sources.fields import category_table, load_json
from kptjax.errors import ConfigError, DataError

SPLIT_PARTS = ("train", "val", "test")
MP100_SPLITS = 5
PathLike = Union[str, os.PathLike]
KPTLLM_CROSS_SUPERCATEGORIES = ("human_body", "human_face", "vehicle", "furniture")
PROTOCOL_FILE = "split_protocol.json"   # split file stem -> the protocol that wrote it


# ------------------------------------------------------------------- category splits
def category_splits(category_ids: Sequence[int], *, num_splits: int = MP100_SPLITS,
                    num_val: int = 10, num_test: int = 20, seed: int = 0
                    ) -> list[dict[str, list[int]]]:
  """Disjoint train / val / test category sets for each of ``num_splits`` splits.

  The categories are shuffled once (``seed``); split k tests on the k-th block of
  ``num_test`` categories, validates on the ``num_val`` categories after it (cyclic)
  and trains on the rest. With 100 categories: 70 / 10 / 20, and every category is a
  test category in exactly one split.

  Returns:
    [{'train': ids, 'val': ids, 'test': ids}] (sorted ids), one dict per split.
  """
  ids = [int(c) for c in category_ids]
  n = len(ids)
  if len(set(ids)) != n:
    raise ConfigError("category_splits: duplicate category ids")
  if num_splits * num_test > n or num_test + num_val >= n:
    raise ConfigError(f"category_splits: {n} categories cannot make {num_splits} splits "
                      f"with {num_test} test and {num_val} val categories each")
  order = [ids[i] for i in np.random.default_rng(seed).permutation(n)]
  splits = []
  for k in range(num_splits):
    test = order[k * num_test:(k + 1) * num_test]
    start = (k + 1) * num_test
    val = [order[(start + j) % n] for j in range(num_val)]
    train = [c for c in order if c not in set(test) | set(val)]
    splits.append({"train": sorted(train), "val": sorted(val), "test": sorted(test)})
  return splits


def split_file_name(split: int, part: str) -> str:
  """'mp100_split{split}_{part}.json' (split counts from 1)."""
  return f"mp100_split{split}_{part}.json"


def subset_by_categories(data: Mapping[str, Any], category_ids: Iterable[int]) -> dict:
  """The COCO dict restricted to ``category_ids`` (their categories, annotations, and
  the images that hold at least one of them)."""
  keep = set(int(c) for c in category_ids)
  anns = [a for a in data["annotations"] if int(a["category_id"]) in keep]
  image_ids = {int(a["image_id"]) for a in anns}
  return {**{k: v for k, v in data.items()
             if k not in ("images", "annotations", "categories")},
          "images": [im for im in data["images"] if int(im["id"]) in image_ids],
          "annotations": anns,
          "categories": [c for c in data["categories"] if int(c["id"]) in keep]}


def write_split_files(ann_file: PathLike, out_dir: PathLike, *, num_splits: int = MP100_SPLITS,
                      num_val: int = 10, num_test: int = 20, seed: int = 0
                      ) -> list[dict[str, list[int]]]:
  """Writes ``out_dir/mp100_split{k}_{train,val,test}.json`` for k = 1..num_splits.

  Args:
    ann_file: an MP-100-style COCO file holding every category.
    out_dir: the folder (made when missing); ``annotations/`` of the MP-100 layout.

  Returns:
    The splits (``category_splits``).
  """
  path = os.fspath(ann_file)
  data = load_json(path)
  ids = list(category_table(data, path))      # unique int ids, in file order
  splits = category_splits(ids, num_splits=num_splits, num_val=num_val, num_test=num_test,
                           seed=seed)
  written = {}
  for k, split in enumerate(splits, start=1):
    for part in SPLIT_PARTS:
      written[split_file_name(k, part)] = (
          subset_by_categories(data, split[part]),
          {"split": "seeded", "seed": int(seed), "index": k, "part": part,
           "num_splits": int(num_splits), "source": os.path.basename(path)})
  _write_split_files(out_dir, written)
  return splits


def cross_supercategory_split(data: Mapping[str, Any], held_out: str) -> dict[str, list[int]]:
  """{'train': ids of every other supercategory, 'test': ids of ``held_out``} (sorted;
  supercategory names match ignoring case, spaces, '-' and '_': 'Human Body' ==
  'human_body'). DataError naming the known supercategories when none matches."""
  test = family_category_ids(data, [held_out])
  train = sorted(set(category_table(data, "<dict>")) - set(test))
  return {"train": train, "test": test}


def cross_split_file_name(held_out: str, part: str) -> str:
  """'mp100_cross_{supercategory}_{part}.json' ('Human Body' -> 'human_body')."""
  return f"mp100_cross_{family_key(held_out)}_{part}.json"


def write_cross_supercategory_files(ann_file: PathLike, out_dir: PathLike, *,
                                    held_out: Sequence[str] = KPTLLM_CROSS_SUPERCATEGORIES
                                    ) -> dict[str, dict[str, list[int]]]:
  """Writes ``out_dir/mp100_cross_{s}_{train,test}.json`` for each held-out supercategory.

  Args:
    ann_file: an MP-100-style COCO file holding every category (with ``supercategory``).
    out_dir: the folder (made when missing).
    held_out: the supercategories tested, one split each (default: KptLLM's four).

  Returns:
    held-out name -> its split (``cross_supercategory_split``).
  """
  path = os.fspath(ann_file)
  data = load_json(path)
  splits, written = {}, {}
  for name in held_out:
    split = splits[name] = cross_supercategory_split(data, name)
    if not split["train"]:
      raise DataError(path, f"supercategory {name!r} holds every category: nothing to "
                      "train on", field="categories")
    for part in ("train", "test"):
      written[cross_split_file_name(name, part)] = (
          subset_by_categories(data, split[part]),
          {"split": "cross_supercategory", "held_out": family_key(name), "part": part,
           "source": os.path.basename(path)})
  _write_split_files(out_dir, written)
  return splits


def _write_split_files(out_dir: PathLike, written: Mapping[str, tuple[dict, dict]]) -> None:
  """Each (COCO subset, protocol) under its file name, and the protocols into
  ``PROTOCOL_FILE`` (merged with the entries already there)."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  manifest = _protocols(out)
  for name, (subset, protocol) in written.items():
    storage.write_json_atomic(out / name, subset, indent=None)
    manifest[pathlib.Path(name).stem] = protocol
  storage.write_json_atomic(out / PROTOCOL_FILE, manifest)


def _protocols(folder: pathlib.Path) -> dict[str, Any]:
  target = folder / PROTOCOL_FILE
  if not target.exists():
    return {}
  data = load_json(os.fspath(target))
  if not isinstance(data, dict):
    raise DataError(os.fspath(target), "a split protocol file maps file stems to protocols",
                    expected="an object")
  return data


def split_protocol(ann_file: PathLike) -> dict[str, Any]:
  """The protocol that made the split file ``ann_file`` (module docstring), ready for
  ``metrics.json``: ``{'split': 'seeded'|'cross_supercategory'|'files', 'seed': ...,
  'held_out': ..., 'file': basename}`` (keys that do not apply are None)."""
  path = pathlib.Path(os.fspath(ann_file))
  found = _protocols(path.parent).get(path.stem)
  protocol = dict(found) if isinstance(found, dict) else {"split": "files"}
  return {"seed": None, "held_out": None, **protocol, "file": path.name}


def entry_split_protocol(entry: Any, where: str = "eval") -> dict[str, Any]:
  """``split_protocol`` of a data entry's annotation file (``config.data.eval``)."""
  _, (ann_file, _), _ = locate(entry, where)
  return split_protocol(ann_file)


# --------------------------------------------------------------------------- supports
def sample_supports(records: Sequence[Any], shots: int, seed: int = 0,
                    queries: Optional[Iterable[int]] = None) -> list[tuple[int, tuple[int, ...]]]:
  """Support instances for each query: ``shots`` records of the query's category.

  Args:
    records: PersonRecords (the category is ``record.spec``; MP-100 has one spec per
      category).
    shots: supports per query (1 or 5 in the papers).
    seed: with the query index, seeds the draw (``default_rng([seed, q])``).
    queries: record indices to draw for (default: all).

  Returns:
    [(query index, support indices)]: supports come from other images of the same
    category, without replacement while enough exist (then with replacement; the
    query itself only when its category has no other instance).
  """
  if shots < 1:
    raise ConfigError(f"shots={shots}: need at least one support")
  by_spec: dict[str, list[int]] = {}
  for i, r in enumerate(records):
    by_spec.setdefault(r.spec, []).append(i)
  out = []
  for q in (range(len(records)) if queries is None else queries):
    q = int(q)
    record = records[q]
    pool = [i for i in by_spec[record.spec]
            if i != q and records[i].image_id != record.image_id]
    pool = pool or [i for i in by_spec[record.spec] if i != q] or [q]
    rng = np.random.default_rng([seed, q])
    chosen = rng.choice(len(pool), shots, replace=len(pool) < shots)
    out.append((q, tuple(int(pool[j]) for j in chosen)))
  return out


def support_keypoint_mask(query: Any, supports: Sequence[Any]) -> np.ndarray:
  """bool[K]: keypoints labeled in the query and in at least one support."""
  labeled = np.asarray(query.keypoints)[:, -1] > 0
  in_support = np.any([np.asarray(s.keypoints)[:, -1] > 0 for s in supports], axis=0)
  return labeled & in_support
