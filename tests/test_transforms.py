"""Top-down transforms: HRNet affine, exact round trips with rotation and flip, warp."""

import dataclasses

import numpy as np
import pytest

from kptjax.data import transforms as T
from kptjax.data.sources import read_coco_keypoints
from kptjax.data.sources.base import PersonRecord
from kptjax.errors import DataError
from kptjax.keypoints import get_spec

ALWAYS = T.AugmentConfig(rotation_prob=1.0, flip_prob=1.0)


def hrnet_affine(center, scale, rot, output_size, inv=False):
  """HRNet's get_affine_transform: three points solved exactly (the reference)."""
  src_w, (dst_w, dst_h) = scale[0] * 200.0, output_size
  r = np.deg2rad(rot)
  src_dir = np.array([0.5 * src_w * np.sin(r), -0.5 * src_w * np.cos(r)])
  third = lambda a, b: b + np.array([-(a - b)[1], (a - b)[0]])
  src = np.stack([center, center + src_dir, np.zeros(2)])
  dst = np.stack([[dst_w / 2, dst_h / 2], [dst_w / 2, dst_h / 2 - dst_w / 2], np.zeros(2)])
  src[2], dst[2] = third(src[0], src[1]), third(dst[0], dst[1])
  a, b = (dst, src) if inv else (src, dst)
  return np.linalg.solve(np.hstack([a, np.ones((3, 1))]), b).T


@pytest.fixture(scope="module")
def coco(shared_data):
  records = read_coco_keypoints(shared_data / "coco" / "test_coco.json", shared_data / "coco")
  return records, T.load_image(records[0].image_path)


@pytest.mark.parametrize("rot", [0.0, 33.0, -40.0])
@pytest.mark.parametrize("size", [(224, 224), (192, 256)])
def test_crop_affine_equals_hrnet_construction(rot, size):
  center, scale = np.array([312.5, 201.25]), np.array([1.7, 2.3])
  for inverse in (False, True):
    np.testing.assert_allclose(T.crop_affine(center, scale, rot, size, inverse=inverse),
                               hrnet_affine(center, scale, rot, size, inverse), atol=1e-4)
  np.testing.assert_allclose(T.compose_affine(T.crop_affine(center, scale, rot, size, inverse=True),
                                              T.crop_affine(center, scale, rot, size)),
                             [[1, 0, 0], [0, 1, 0]], atol=1e-4)  # f32 storage of ~300 px


def test_box_to_center_scale_matches_locllm():
  center, scale = T.box_to_center_scale([10.0, 20.0, 100.0, 50.0], 1.0, 1.0)
  np.testing.assert_allclose(center, [60.0, 45.0])
  np.testing.assert_allclose(scale, [0.5, 0.5])  # widened to a square, / 200 px
  _, scale = T.box_to_center_scale([0, 0, 30.0, 60.0], 0.75, 1.25)
  np.testing.assert_allclose(scale, [45.0 / 200 * 1.25, 60.0 / 200 * 1.25])


@pytest.mark.parametrize("seed", range(4))
def test_forward_then_inverse_is_exact_with_rotation_and_flip(coco, seed):
  records, image = coco
  record = records[0]
  rng = np.random.default_rng(seed)
  out = T.crop_person(record, image, (224, 224), padding=1.25, rng=rng, augment_cfg=ALWAYS)
  assert out["flipped"] and out["rotation"] != 0.0
  back = T.keypoints_to_image(out["keypoints"], out["affine_inv"], out["flipped"], record.spec)
  np.testing.assert_allclose(back[:, :2], record.keypoints[:, :2], atol=1e-3)
  # Rows of the crop are in flipped (left <-> right swapped) order.
  spec = get_spec("coco17")
  ls, rs = spec.index("left shoulder"), spec.index("right shoulder")
  np.testing.assert_allclose(T.apply_affine(out["keypoints"][ls:ls + 1, :2], out["affine_inv"]),
                             record.keypoints[rs:rs + 1, :2], atol=1e-3)


def test_image_and_keypoints_move_together():
  # A white 3x3 dot at each keypoint: after crop (rotated, flipped, scaled) the dot
  # must be where the keypoint landed (within the half pixel of bilinear blur).
  image = np.zeros((300, 400, 3), np.uint8)
  pts = np.array([[100.0, 80.0], [250.0, 200.0], [180.0, 150.0]], np.float32)
  for x, y in pts.astype(int):
    image[y - 1:y + 2, x - 1:x + 2] = 255
  kpts = np.zeros((17, 3), np.float32)
  kpts[[0, 5, 12], :2], kpts[[0, 5, 12], 2] = pts, 2
  record = PersonRecord("", (400, 300), np.array([60, 40, 240, 200], np.float32), kpts, "coco17")
  for seed in range(3):
    out = T.crop_person(record, image, (128, 128), padding=1.3,
                        rng=np.random.default_rng(seed), augment_cfg=ALWAYS)
    crop = out["image"].astype(np.float32).sum(-1)
    for x, y, v in out["keypoints"]:
      if v > 0:
        ys, xs = np.mgrid[int(y) - 3:int(y) + 4, int(x) - 3:int(x) + 4]
        w = crop[ys, xs]
        assert abs((w * xs).sum() / w.sum() - x) < 0.5 and abs((w * ys).sum() / w.sum() - y) < 0.5


def test_flip_twice_is_identity_and_swaps_names():
  spec = get_spec("coco17")
  rng = np.random.default_rng(0)
  kpts = np.concatenate([rng.uniform(0, 500, (17, 2)), np.full((17, 1), 2.0)], 1).astype(np.float32)
  once = T.flip_keypoints(kpts, 640, spec)
  np.testing.assert_allclose(T.flip_keypoints(once, 640, spec), kpts, atol=1e-4)  # f32 639 - x
  for name in ("left eye", "left wrist", "right ankle", "nose"):
    i, j = spec.index(name), spec.index(spec.flip_partner(name))
    assert once[i, 0] == pytest.approx(639 - kpts[j, 0]) and once[i, 1] == kpts[j, 1]
  image = rng.integers(0, 255, (4, 6, 3), dtype=np.uint8)
  np.testing.assert_array_equal(T.flip_image(T.flip_image(image)), image)


def test_flip_in_affine_equals_warping_the_flipped_image(coco):
  records, image = coco
  record = records[0]
  out = T.crop_person(record, image, (96, 96), padding=1.0, rng=np.random.default_rng(1),
                      augment_cfg=ALWAYS)
  ref = T.warp_image(np.ascontiguousarray(T.flip_image(image)),
                     T.crop_affine(out["center"], out["scale"], out["rotation"], (96, 96)), (96, 96))
  assert np.abs(out["image"].astype(int) - ref.astype(int)).max() <= 1


def test_warp_is_bilinear_at_cv2_sample_positions():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (120, 150, 3), dtype=np.uint8)
  affine = T.crop_affine([70.0, 60.0], [0.4, 0.4], 25.0, (64, 64))
  inv = T.invert_affine(affine).astype(np.float64)
  ys, xs = np.mgrid[0:64, 0:64]
  sx, sy = (inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2], inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2])
  x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
  fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
  f = image.astype(np.float64)
  ref = (f[y0, x0] * (1 - fx) * (1 - fy) + f[y0, x0 + 1] * fx * (1 - fy)
         + f[y0 + 1, x0] * (1 - fx) * fy + f[y0 + 1, x0 + 1] * fx * fy)
  # Pillow works in 8-bit fixed point: at most one level off a float reference.
  assert np.abs(T.warp_image(image, affine, (64, 64)) - ref).max() <= 1.0


def test_out_of_crop_keypoints_lose_visibility():
  kpts = np.array([[0, 0, 2], [-0.5, 3, 2], [10, 223.9, 1], [224, 10, 2]], np.float32)
  np.testing.assert_array_equal(T.keypoints_in_crop(kpts, (224, 224)), [True, False, True, False])
  record = PersonRecord("", (100, 100), np.array([40, 40, 20, 20], np.float32),
                        np.array([[50, 50, 2], [5, 5, 2], [50, 50, 0]] + [[0, 0, 0]] * 14,
                                 np.float32), "coco17")
  out = T.crop_person(record, np.zeros((100, 100, 3), np.uint8), (32, 32), padding=1.0)
  np.testing.assert_array_equal(out["keypoints"][:3, 2], [2, 0, 0])
  np.testing.assert_allclose(out["keypoints"][0, :2], [16.0, 16.0], atol=1e-4)


def test_random_augment_follows_locllm_defaults():
  rng = np.random.default_rng(0)
  draws = np.array([T.random_augment(rng) for _ in range(4000)], np.float64)
  scale, rot, flip = draws.T
  assert scale.min() >= 0.7 and scale.max() <= 1.3 and abs(scale.mean() - 1.0) < 0.02
  assert np.abs(rot).max() <= 40.0 and abs((rot != 0).mean() - 0.5) < 0.04
  assert abs(flip.mean() - 0.5) < 0.04
  none = T.random_augment(rng, {"rotation_prob": 0.0, "flip_prob": 0.0, "scale_sigma": 0.0})
  assert none == (1.0, 0.0, False)


def test_normalize_image():
  img = np.array([[[0, 255, 128]]], np.uint8)
  mean, std = T.NORMALIZATION["clip"]
  np.testing.assert_allclose(T.normalize_image(img, "clip")[0, 0],
                             (np.array([0, 255, 128]) / 255 - mean) / std, rtol=1e-5)
  assert T.normalize_image(img, "imagenet").dtype == np.float32
  with pytest.raises(ValueError):
    T.normalize_image(img, "nope")


def test_corrupt_and_missing_images_raise_data_error(tmp_path, shared_data):
  good = (shared_data / "coco" / "000000000785.jpg").read_bytes()
  assert T.load_image(good).shape == (425, 640, 3)
  truncated = tmp_path / "truncated.jpg"
  truncated.write_bytes(good[: len(good) // 3])
  garbage = tmp_path / "garbage.jpg"
  garbage.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 10)
  for path in (truncated, garbage, tmp_path / "absent.jpg"):
    with pytest.raises(DataError) as err:
      T.load_image(path)
    assert str(path) in str(err.value) and err.value.field == "image"
  record = dataclasses.replace(PersonRecord("", (1, 1), np.zeros(4), np.zeros((17, 3)), "coco17"),
                               image_bytes=garbage.read_bytes())
  with pytest.raises(DataError, match="image_bytes"):
    T.load_record_image(record)


def test_decoded_images_keep_the_newest_within_budget(coco, tmp_path):
  import pickle
  records, _ = coco
  paths = sorted({r.image_path for r in records})[:3]
  recs = [dataclasses.replace(records[0], image_path=p) for p in paths]
  sizes = [T.load_image(p).nbytes for p in paths]
  cache = T.DecodedImages((sizes[0] + sizes[1] + sizes[2] - 1) / 2**20)  # not all three
  for rec in recs:
    image = cache(rec)
    np.testing.assert_array_equal(image, T.load_record_image(rec))
    assert not image.flags.writeable
  assert cache(recs[2]) is cache(recs[2])          # kept: no second decode
  assert len(cache) == 2 and cache.nbytes == sizes[1] + sizes[2]   # the oldest went
  assert pickle.loads(pickle.dumps(cache)).nbytes == 0            # a worker starts empty
  tiny = T.DecodedImages(1e-6)                                     # no image fits: none kept
  np.testing.assert_array_equal(tiny(recs[0]), T.load_record_image(recs[0]))
  assert len(tiny) == 0
  missing = dataclasses.replace(records[0], image_path=str(tmp_path / "absent.jpg"))
  for _ in range(2):                                               # errors are not cached
    with pytest.raises(DataError, match="absent.jpg"):
      cache(missing)


def test_crop_recipe_with_decoded_images_gives_the_same_crops(coco):
  records, _ = coco
  plain = T.CropRecipe(side=64, padding=1.25, normalization="clip")
  cached = dataclasses.replace(plain, images=T.DecodedImages(64))
  for _ in range(2):
    for rec in records[:4]:
      a = plain(rec, "coco17", np.random.default_rng(rec.ann_id))
      b = cached(rec, "coco17", np.random.default_rng(rec.ann_id))
      np.testing.assert_array_equal(a["image"], b["image"])
      np.testing.assert_array_equal(a["keypoints"], b["keypoints"])
  assert len(cached.images) == len({r.image_path for r in records[:4]})


def test_negative_image_cache_is_refused():
  import ml_collections
  from kptjax.errors import ConfigError
  config = ml_collections.ConfigDict(dict(
      model=dict(vit=dict(image_size=48)),
      data=dict(padding=1.0, normalization="clip", image_cache_mb=-1,
                augment=dict(scale_sigma=0.0, scale_min=1.0, scale_max=1.0, rotation=0.0,
                             rotation_prob=0.0, flip_prob=0.0))))
  with pytest.raises(ConfigError, match="data.image_cache_mb"):
    T.CropRecipe.from_config(config)
