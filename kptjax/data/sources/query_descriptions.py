"""Query descriptions for category-agnostic keypoints (CapeLLM's detailed text queries).

CapeLLM asks for each keypoint with a detailed description of where it is; its
descriptions are not public. These are kptjax's own, written from what an MP-100-style
annotation file holds (the category name, its keypoint names and its skeleton), so they
exist for every category of any such file:

    "The left front paw of the dog: on the dog's left side, at the front. It is linked to
     the left front knee."

``describe(category, names, skeleton)`` -> one text per keypoint. ``read_mp100(...,
descriptions='generated')`` uses them where the file gives none.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_SIDES = (("left", "on the {c}'s left side"), ("right", "on the {c}'s right side"))
_PLACES = (("front", "at the front"), ("back", "at the back"), ("rear", "at the rear"),
           ("upper", "in its upper part"), ("lower", "in its lower part"),
           ("top", "at the top"), ("bottom", "at the bottom"), ("center", "at the centre"),
           ("middle", "in the middle"), ("tip", "at the tip"), ("base", "at the base"))


def _words(name: str) -> set[str]:
  return set(re.findall(r"[a-z]+", name.lower()))


def _join(items: Sequence[str]) -> str:
  return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def describe(category: str, names: Sequence[str], skeleton: Sequence[Sequence[int]] = ()
             ) -> list[str]:
  """One description per keypoint.

  Args:
    category: the category name (underscores read as spaces).
    names: K keypoint names (underscores read as spaces).
    skeleton: limbs as 0-based index pairs into ``names``.

  Returns:
    K texts: the keypoint and its category, where its name places it (side, part), and
    the keypoints a limb links it to.
  """
  c = category.replace("_", " ")
  names = [n.replace("_", " ") for n in names]
  links: list[list[str]] = [[] for _ in names]
  for a, b in skeleton:
    links[a].append(names[b])
    links[b].append(names[a])
  out = []
  for name, linked in zip(names, links):
    words = _words(name)
    where = [text.format(c=c) for key, text in _SIDES + _PLACES if key in words]
    text = f"The {name} of the {c}"
    text += (": " + ", ".join(where) + "." if where else ".")
    if linked:
      text += f" It is linked to the {_join(sorted(set(linked)))}."
    out.append(text)
  return out
