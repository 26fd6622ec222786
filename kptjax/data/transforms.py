"""Top-down person crops: box -> center/scale -> affine warp, augmentation, flip, inverse.

Conventions (those of HRNet/mmpose ``get_affine_transform``, which LocLLM uses):

* Pixel coordinates index pixel centers: pixel (i, j) covers [i-0.5, i+0.5) and its
  center is (i, j). A horizontal flip maps x -> W - 1 - x.
* A person is a ``center`` f32[2] (pixels) and a ``scale`` f32[2] (box width, height
  in units of ``pixel_std`` = 200 px). The crop affine maps the image to the
  ``output_size`` (w, h) crop with a similarity: rotation by ``rotation_deg`` about
  the center and the zoom ``w / (scale[0] * pixel_std)``.
* An affine is f32[2, 3]: ``[x', y'] = A[:, :2] @ [x, y] + A[:, 2]``.

``CropRecipe`` is the one crop + normalize recipe of every model input (training,
evaluation, supports, prediction): load the record's image, ``crop_person``, normalize.
``crop_person`` composes the optional
flip into the affine (one bilinear warp of the original image, no flipped copy),
maps keypoints with it, swaps left/right keypoints through the spec, and zeroes the
visibility of keypoints that fall outside the crop. ``keypoints_to_image`` maps
crop predictions back.

Images are uint8[H, W, 3] RGB. ``load_image`` decodes a file (or bytes) with Pillow
and raises ``DataError`` naming the file when it is missing or cannot be decoded
(corrupt JPEG): the bad-image policy is an error at load time, not a silent skip.
EXIF orientation is ignored (as LocLLM's cv2.IMREAD_IGNORE_ORIENTATION).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import threading
from typing import Any, Mapping, Optional, Union

import numpy as np
from PIL import Image

from kptjax.errors import ConfigError, DataError, ImageError
from kptjax.keypoints import KeypointSpec, get_spec

# CLIP (LocLLM's default) and ImageNet (DINOv2, `dino_norm`) RGB mean / std.
NORMALIZATION = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
NORMALIZATION["dino"] = NORMALIZATION["imagenet"]


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """LocLLM's training augmentation (defaults from its public code).

  scale factor = clip(N(1, scale_sigma), scale_min, scale_max); rotation =
  U(-rotation_max, rotation_max) degrees with probability rotation_prob, else 0;
  horizontal flip with probability flip_prob.
  """
  scale_sigma: float = 0.3
  scale_min: float = 0.7
  scale_max: float = 1.3
  rotation_max: float = 40.0
  rotation_prob: float = 0.5
  flip_prob: float = 0.5


NO_AUGMENT = AugmentConfig(scale_sigma=0.0, scale_min=1.0, scale_max=1.0, rotation_max=0.0,
                           rotation_prob=0.0, flip_prob=0.0)


def augment_config(config: Any) -> AugmentConfig:
  """config.data.augment (its ``rotation`` is the maximum angle) as an AugmentConfig."""
  a = config.data.augment
  return AugmentConfig(
      scale_sigma=float(a.scale_sigma), scale_min=float(a.scale_min),
      scale_max=float(a.scale_max), rotation_max=float(a.rotation),
      rotation_prob=float(a.rotation_prob), flip_prob=float(a.flip_prob))


# ----------------------------------------------------------------------------- images


def load_image(source: Union[str, os.PathLike, bytes]) -> np.ndarray:
  """Decodes an image file (or encoded bytes) to uint8[H, W, 3] RGB.

  Raises:
    DataError: the file is missing or is not a decodable image (names the file).
  """
  name = "<bytes>" if isinstance(source, (bytes, bytearray)) else os.fspath(source)
  try:
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")
  except OSError as e:
    raise ImageError(name, f"cannot open image: {e.strerror or e}", field="image") from e
  try:
    with fp, Image.open(fp) as img:
      img.load()
      if img.mode != "RGB":
        img = img.convert("RGB")
      return np.asarray(img, dtype=np.uint8)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ImageError(name, f"cannot decode image: {e}", field="image",
                    expected="a readable JPEG/PNG") from e


def load_record_image(record: Any) -> np.ndarray:
  """The image of a PersonRecord: its ``image_bytes`` if set, else its file."""
  if getattr(record, "image_bytes", None):
    try:
      return load_image(record.image_bytes)
    except DataError as e:
      raise ImageError(record.image_path or "<image_bytes>", str(e), field="image_bytes",
                      record=record.ann_id) from e
  return load_image(record.image_path)


class DecodedImages:
  """Decoded file images kept in memory up to ``budget_mb`` (least recently used out).

  ``load_record_image`` with a memory: a training run that reads the same few thousand
  images every epoch decodes each once. The read threads of a process share one cache
  (a lock guards it); a grain worker process starts with an empty one. Arrays come back
  read-only. Records with ``image_bytes`` and images that fail to load are not kept.
  """

  def __init__(self, budget_mb: float):
    self.budget = int(float(budget_mb) * 2**20)
    self._lock = threading.Lock()
    self._images: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
    self.nbytes = 0

  def __call__(self, record: Any) -> np.ndarray:
    """``load_record_image(record)``, from memory after the first time."""
    path = None if getattr(record, "image_bytes", None) else os.fspath(record.image_path)
    if path is None:
      return load_record_image(record)
    with self._lock:
      image = self._images.get(path)
      if image is not None:
        self._images.move_to_end(path)
        return image
    image = load_record_image(record)
    image.flags.writeable = False
    if image.nbytes <= self.budget:
      with self._lock:
        if path not in self._images:
          self._images[path] = image
          self.nbytes += image.nbytes
        while self.nbytes > self.budget:
          _, old = self._images.popitem(last=False)
          self.nbytes -= old.nbytes
    return image

  def __len__(self) -> int:
    return len(self._images)

  def __getstate__(self) -> dict[str, Any]:    # a worker process gets an empty cache
    return {"budget_mb": self.budget / 2**20}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(state["budget_mb"])


def normalize_image(image: np.ndarray, kind: str = "clip") -> np.ndarray:
  """uint8[..., 3] -> f32[..., 3]: (x / 255 - mean) / std, ``kind`` 'clip' | 'imagenet'."""
  if kind not in NORMALIZATION:
    raise ValueError(f"unknown normalization {kind!r}; choose from {sorted(NORMALIZATION)}")
  mean, std = NORMALIZATION[kind]
  scale = np.float32(1.0 / 255.0) / np.asarray(std, np.float32)
  offset = np.asarray(mean, np.float32) / np.asarray(std, np.float32)
  return image.astype(np.float32) * scale - offset


def flip_image(image: np.ndarray) -> np.ndarray:
  """Horizontal flip of uint8[H, W, C]: pixel x goes to W - 1 - x."""
  return image[:, ::-1]


# ----------------------------------------------------------------------------- geometry


def box_to_center_scale(box_xywh, aspect_ratio: float = 1.0, padding: float = 1.25,
                        pixel_std: float = 200.0) -> tuple[np.ndarray, np.ndarray]:
  """Person box (x, y, w, h pixels) -> center f32[2] (pixels), scale f32[2] (/pixel_std).

  The box is grown to ``aspect_ratio`` (= w / h of the crop) about its center, then
  multiplied by ``padding`` (LocLLM: 1.0 on COCO, 1.25 on MPII).
  """
  x, y, w, h = (float(v) for v in box_xywh[:4])
  center = np.array([x + w * 0.5, y + h * 0.5], np.float32)
  if w > aspect_ratio * h:
    h = w / aspect_ratio
  elif w < aspect_ratio * h:
    w = h * aspect_ratio
  scale = np.array([w / pixel_std, h / pixel_std], np.float32) * np.float32(padding)
  return center, scale


def crop_affine(center, scale, rotation_deg: float, output_size: tuple[int, int],
                pixel_std: float = 200.0, inverse: bool = False) -> np.ndarray:
  """f32[2, 3] affine from image pixels to crop pixels (or back when ``inverse``).

  Equal to HRNet/mmpose ``get_affine_transform(center, scale, rot, output_size)``
  (closed form of its three-point construction): crop = k R(-rot) (p - center) +
  (w/2, h/2), with k = w / (scale[0] * pixel_std), R the rotation matrix.
  """
  cx, cy = float(center[0]), float(center[1])
  width, height = float(output_size[0]), float(output_size[1])
  src_w = float(np.asarray(scale, np.float64).reshape(-1)[0]) * pixel_std
  theta = np.deg2rad(float(rotation_deg))
  cos, sin = np.cos(theta), np.sin(theta)
  if not inverse:
    k = width / src_w
    lin = k * np.array([[cos, sin], [-sin, cos]])
    t = np.array([width * 0.5, height * 0.5]) - lin @ np.array([cx, cy])
  else:
    k = src_w / width
    lin = k * np.array([[cos, -sin], [sin, cos]])
    t = np.array([cx, cy]) - lin @ np.array([width * 0.5, height * 0.5])
  return np.concatenate([lin, t[:, None]], axis=1).astype(np.float32)


def flip_affine(image_width: int) -> np.ndarray:
  """f32[2, 3] affine of the horizontal flip x -> W - 1 - x."""
  return np.array([[-1.0, 0.0, image_width - 1.0], [0.0, 1.0, 0.0]], np.float32)


def compose_affine(second: np.ndarray, first: np.ndarray) -> np.ndarray:
  """The affine applying ``first`` then ``second`` (both [2, 3])."""
  a = np.vstack([np.asarray(second, np.float64), [0.0, 0.0, 1.0]])
  b = np.vstack([np.asarray(first, np.float64), [0.0, 0.0, 1.0]])
  return (a @ b)[:2].astype(np.float32)


def invert_affine(affine: np.ndarray) -> np.ndarray:
  """The inverse of an invertible f32[2, 3] affine (computed in float64)."""
  m = np.vstack([np.asarray(affine, np.float64), [0.0, 0.0, 1.0]])
  return np.linalg.inv(m)[:2].astype(np.float32)


def apply_affine(points: np.ndarray, affine: np.ndarray) -> np.ndarray:
  """f32[..., 2] points mapped by a [2, 3] affine (computed in float64)."""
  p = np.asarray(points, np.float64)
  a = np.asarray(affine, np.float64)
  return (p @ a[:, :2].T + a[:, 2]).astype(np.float32)


def warp_image(image: np.ndarray, affine: np.ndarray, output_size: tuple[int, int]) -> np.ndarray:
  """uint8[H, W, 3] -> uint8[h, w, 3] sampled bilinearly at ``affine``^-1 of each pixel.

  Same sampling positions as ``cv2.warpAffine(image, affine, (w, h), INTER_LINEAR)``
  (pixel-center convention above); outside the image is black.
  """
  inv = np.asarray(invert_affine(affine), np.float64)
  # Pillow samples at pixel centres (x + 0.5) in [0, W) coordinates: shift by half a
  # pixel on both sides so the map acts on pixel-centre indices like cv2.
  a, b, c = inv[0]
  d, e, f = inv[1]
  coeffs = (a, b, c + 0.5 - 0.5 * (a + b), d, e, f + 0.5 - 0.5 * (d + e))
  pil = Image.fromarray(np.ascontiguousarray(image))
  out = pil.transform((int(output_size[0]), int(output_size[1])), Image.Transform.AFFINE,
                      coeffs, resample=Image.Resampling.BILINEAR)
  return np.asarray(out, dtype=np.uint8)


# ----------------------------------------------------------------------------- keypoints


def flip_keypoints(keypoints: np.ndarray, image_width: int,
                   spec: Union[str, KeypointSpec]) -> np.ndarray:
  """Horizontal flip of keypoints f32[K, 3+] (x, y, ..., v): x -> W - 1 - x, and rows
  swapped left <-> right through ``spec.flip_pairs``. Applying it twice is identity."""
  spec = get_spec(spec)
  out = np.array(keypoints, dtype=np.float32, copy=True)
  out[:, 0] = (image_width - 1) - out[:, 0]
  return out[spec.flip_permutation()]


def keypoints_in_crop(keypoints_crop: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """bool[K]: 0 <= x < w and 0 <= y < h (crop pixels), as LocLLM keeps a keypoint."""
  x, y = keypoints_crop[:, 0], keypoints_crop[:, 1]
  return (x >= 0) & (x < size[0]) & (y >= 0) & (y < size[1])


def random_augment(rng: np.random.Generator,
                   cfg: Union[AugmentConfig, Mapping[str, Any], Any, None] = None
                   ) -> tuple[float, float, bool]:
  """Draws (scale_factor, rotation_deg, flip) with LocLLM's defaults (AugmentConfig).

  ``cfg`` may be an AugmentConfig, a mapping or a ConfigDict with any of its fields.
  """
  base = AugmentConfig()
  def get(name):
    if cfg is None:
      return getattr(base, name)
    if isinstance(cfg, Mapping):
      return cfg.get(name, getattr(base, name))
    return getattr(cfg, name, getattr(base, name))
  scale = float(np.clip(rng.standard_normal() * get("scale_sigma") + 1.0,
                        get("scale_min"), get("scale_max")))
  rotate = rng.random() < get("rotation_prob")
  angle = float(rng.uniform(-get("rotation_max"), get("rotation_max")))
  rotation = angle if rotate else 0.0
  flip = bool(rng.random() < get("flip_prob"))
  return scale, rotation, flip


def crop_person(record: Any, image: np.ndarray, output_size: tuple[int, int], *,
                padding: float = 1.0, rng: Optional[np.random.Generator] = None,
                augment_cfg: Union[AugmentConfig, Mapping[str, Any], Any, None] = None,
                spec: Union[str, KeypointSpec, None] = None,
                pixel_std: float = 200.0) -> dict[str, Any]:
  """Top-down crop of one person (with augmentation when ``rng`` is given).

  Args:
    record: a PersonRecord (box xywh and keypoints in original-image pixels).
    image: uint8[H, W, 3], the record's image.
    output_size: (w, h) of the crop in pixels, e.g. (224, 224).
    padding: box padding factor (LocLLM: 1.0 on COCO, 1.25 on MPII).
    rng: if given, draw scale / rotation / flip with ``random_augment``.
    augment_cfg: augmentation parameters (AugmentConfig fields).
    spec: the keypoint spec (default: ``record.spec``), for the left/right swap.
    pixel_std: scale unit in pixels.

  Returns:
    dict with ``image`` uint8[h, w, 3]; ``keypoints`` f32[K, 3] (x, y in crop pixels,
    visibility; 0 when unlabeled or outside the crop; rows swapped when flipped);
    ``affine`` f32[2, 3] image -> crop (flip included); ``affine_inv`` crop -> image;
    ``flipped`` bool; ``center`` f32[2], ``scale`` f32[2], ``rotation`` float (degrees)
    of the crop in the (flipped when ``flipped``) image; and, when the record has
    them, ``keypoints_3d`` f32[K, 4] (rows swapped and x negated when flipped; z and
    visibility unchanged).
  """
  height, width = image.shape[:2]
  aspect = float(output_size[0]) / float(output_size[1])
  center, scale = box_to_center_scale(record.box, aspect, padding, pixel_std)
  scale_factor, rotation, flipped = 1.0, 0.0, False
  if rng is not None:
    scale_factor, rotation, flipped = random_augment(rng, augment_cfg)
  scale = scale * np.float32(scale_factor)

  kpts = np.asarray(record.keypoints, np.float32)
  out = np.zeros((kpts.shape[0], 3), np.float32)
  out[:, :2] = kpts[:, :2]
  out[:, 2] = kpts[:, -1]
  kpts3d = getattr(record, "keypoints_3d", None)
  kpts3d = None if kpts3d is None else np.array(kpts3d, np.float32, copy=True)

  affine = crop_affine(center, scale, rotation, output_size, pixel_std)
  if flipped:
    center = np.array([width - 1.0 - center[0], center[1]], np.float32)
    affine = compose_affine(crop_affine(center, scale, rotation, output_size, pixel_std),
                            flip_affine(width))
    perm = get_spec(spec if spec is not None else record.spec).flip_permutation()
    out = out[perm]
    if kpts3d is not None:
      kpts3d = kpts3d[perm]
      kpts3d[:, 0] = -kpts3d[:, 0]

  out[:, :2] = apply_affine(out[:, :2], affine)
  out[:, 2] = np.where(keypoints_in_crop(out, output_size), out[:, 2], 0.0)
  result = {
      "image": warp_image(image, affine, output_size),
      "keypoints": out,
      "affine": affine,
      "affine_inv": invert_affine(affine),
      "flipped": flipped,
      "center": center,
      "scale": scale,
      "rotation": float(rotation),
  }
  if kpts3d is not None:
    result["keypoints_3d"] = kpts3d
  return result


def keypoints_to_image(keypoints_crop: np.ndarray, affine_inv: np.ndarray, flipped: bool = False,
                       spec: Union[str, KeypointSpec, None] = None) -> np.ndarray:
  """Maps crop keypoints f32[K, 2+] back to original-image pixels.

  Rows are in the crop's order; when the crop was flipped they are swapped back to
  the record's order through ``spec`` (required then). Columns past x, y are kept.
  """
  out = np.array(keypoints_crop, np.float32, copy=True)
  out[:, :2] = apply_affine(out[:, :2], affine_inv)
  if flipped:
    if spec is None:
      raise ValueError("a flipped crop needs the keypoint spec to swap rows back")
    out = out[get_spec(spec).flip_permutation()]
  return out


@dataclasses.dataclass(frozen=True)
class CropRecipe:
  """The crop + normalize recipe: record -> its image -> top-down crop -> model input.

  Attributes:
    side: crop side S in px (``config.model.vit.image_size``).
    padding: box padding factor (``config.data.padding``).
    normalization: ``NORMALIZATION`` key (``config.data.normalization``).
    augment: what a call with an ``rng`` draws from (``config.data.augment``).
    images: where decoded images are kept between calls (``config.data.image_cache_mb``
      > 0), or None: every call decodes its file.
  """
  side: int
  padding: float
  normalization: str
  augment: AugmentConfig = AugmentConfig()
  images: Optional[DecodedImages] = None

  @classmethod
  def from_config(cls, config: Any) -> "CropRecipe":
    """The recipe of a full config (model.vit.image_size, data.padding / normalization /
    augment)."""
    cache_mb = float(config.data.get("image_cache_mb", 0))
    if not cache_mb >= 0:
      raise ConfigError(f"data.image_cache_mb={cache_mb} must be >= 0 (MB; 0: no cache)")
    return cls(side=int(config.model.vit.image_size), padding=float(config.data.padding),
               normalization=config.data.normalization, augment=augment_config(config),
               images=DecodedImages(cache_mb) if cache_mb > 0 else None)

  def __call__(self, record: Any, spec: Union[str, KeypointSpec, None] = None,
               rng: Optional[np.random.Generator] = None) -> dict[str, Any]:
    """``crop_person``'s dict for ``record`` (augmented when ``rng`` is given) with
    ``image`` f32[S, S, 3] normalized; ``keypoints`` f32[K, 3] are in crop px.

    Raises:
      ImageError: the record's image is missing or cannot be decoded.
    """
    image = self.images(record) if self.images is not None else load_record_image(record)
    crop = crop_person(record, image, (self.side, self.side),
                       padding=self.padding, rng=rng, augment_cfg=self.augment, spec=spec)
    crop["image"] = normalize_image(crop["image"], self.normalization).astype(np.float32)
    return crop
