"""LLaVA-style image-caption JSON -> CaptionRecords (stage-1 image-text alignment).

Accepted entries (a JSON list):
  * LLaVA conversations: ``{"id", "image", "conversations": [{"from": "human",
    "value": "<image>\\n..."}, {"from": "gpt", "value": CAPTION}]}`` — the caption is
    the first 'gpt' turn;
  * flat pairs: ``{"image", "caption"}`` (or ``"blip_caption"``, as in LLaVA's
    ``*_meta.json``).

Bad input: a file that is not a JSON list, an entry without ``image`` or with a
malformed ``conversations`` -> DataError naming the file and the entry. Counted,
logged skips: 'no_caption' (no gpt turn / empty caption), 'missing_image' (checked at
read time; ``check_images=False`` defers it to DataError at load time).
"""

from __future__ import annotations

import os
from typing import Union

from kptjax.data.sources.base import CaptionRecord, Records
from kptjax.data.sources.fields import ExistsCache, field, load_json
from kptjax.errors import DataError


def read_llava_captions(json_file: Union[str, os.PathLike], image_root: Union[str, os.PathLike], *,
                        check_images: bool = True) -> Records:
  """Reads image-caption pairs; returns Records of CaptionRecord with ``.skipped``."""
  path = os.fspath(json_file)
  entries = load_json(path)
  if not isinstance(entries, list):
    raise DataError(path, "a caption file must hold a list",
                    expected="[{image, conversations | caption}, ...]")
  exists = ExistsCache()
  records = Records(source=path)
  for i, entry in enumerate(entries):
    where = f"[{i}]"
    image = field(entry, "image", path, where, str, record=entry.get("id") if isinstance(
        entry, dict) else None)
    caption = entry.get("caption", entry.get("blip_caption"))
    if "conversations" in entry:
      turns = entry["conversations"]
      if not isinstance(turns, list) or not all(
          isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns):
        raise DataError(path, "malformed conversation", field=f"{where}.conversations",
                        expected="[{from, value}, ...]")
      caption = next((t["value"] for t in turns if t.get("from") in ("gpt", "assistant")), None)
    if not isinstance(caption, str) or not caption.strip():
      records.skipped["no_caption"] += 1
      continue
    image_path = os.path.join(os.fspath(image_root), image)
    if check_images and not exists(image_path):
      records.skipped["missing_image"] += 1
      continue
    records.append(CaptionRecord(image_path=image_path, caption=caption.strip(),
                                 id=str(entry.get("id", i))))
  records.log_summary("read_llava_captions")
  return records
