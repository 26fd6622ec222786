"""KptLLM's training stream on the synthetic objects (MP-100 style): static shapes,
tasks mixed in one run, visual supports from other images of the same category with the
prompted keypoint's position, semantic supports = the query crop, deterministic by seed;
an unreadable query or support image skips the element (counted) or, strict, raises."""

import dataclasses

import numpy as np
import pytest

from configs import tiny
from kptjax.data import kpt_pipeline, pipeline
from kptjax.data.tokenizer import load_tokenizer
from kptjax.errors import ImageError

B, SHOTS, ROUNDS, MAX_LEN = 6, 2, 2, 160


def _config(root):
  c = tiny.get_config().unlock()
  c.model.kpt.enabled = True
  c.data.train.update(source="synthetic_objects", path=str(root), num_images=12, split="train")
  c.data.update(tasks="semantic:1,visual:1,textual:1", shots=SHOTS, rounds=ROUNDS,
                max_len=MAX_LEN, coord_format="keypoint_token", read_threads=1)
  c.data.augment.flip_prob = 0.0        # markers are chiral (synthetic_objects docstring)
  c.train.batch_size = B
  return c.lock()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  config = _config(tmp_path_factory.mktemp("objects"))
  tok = load_tokenizer("")
  records = pipeline.load_records(config, "train")
  it = iter(kpt_pipeline.make_kpt_train_dataset(config, tok, records=records))
  return config, tok, records, [next(it) for _ in range(4)]


def test_batch_shapes(setup):
  config, _, records, batches = setup
  side = config.model.vit.image_size
  b = batches[0]
  assert len(records) == 12
  assert b["image"].shape == (B, side, side, 3) and b["tokens"].shape == (B, MAX_LEN)
  assert b["support_image"].shape == (B, SHOTS, side, side, 3)
  assert b["support_xy"].shape == (B, SHOTS, ROUNDS, 2)
  assert b["support_mask"].shape == (B, SHOTS, ROUNDS)
  assert b["kpt_xy"].shape == (B, ROUNDS, 2) and b["kpt_mask"].shape == (B, ROUNDS)


def test_tasks_mix_and_slots_match_tokens(setup):
  config, _, _, batches = setup
  k = config.model.kpt
  seen = set()
  for b in batches:
    for row in range(B):
      prompts = int(np.sum(b["tokens"][row] == k.prompt_token_id))
      keypoints = int(np.sum(b["tokens"][row] == k.keypoint_token_id))
      assert keypoints == int(b["kpt_mask"][row].sum())
      assert prompts == int(np.sum(b["support_mask"][row].max(0) > 0))
      if prompts and keypoints:
        seen.add("visual")
        assert np.any(b["support_image"][row, 1] != 0)         # two shots drawn
      elif prompts:
        seen.add("semantic")
        np.testing.assert_array_equal(b["support_image"][row, 0], b["image"][row])
        assert not np.any(b["support_mask"][row, 1])            # one support: the query
      elif keypoints:
        seen.add("textual")
        assert not np.any(b["support_mask"][row]) and not np.any(b["support_image"][row])
  assert seen == {"semantic", "visual", "textual"}


def test_semantic_prompt_is_the_answered_keypoint(setup):
  """In a semantic row the prompt sits at the query keypoint the round asks about; the
  loss covers only answers."""
  _, _, _, batches = setup
  for b in batches:
    for row in range(B):
      mask = b["support_mask"][row]
      if mask[0].any() and not mask[1].any() and not b["kpt_mask"][row].any():
        rounds = mask[0] > 0
        np.testing.assert_allclose(b["support_xy"][row, 0][rounds], b["kpt_xy"][row][rounds],
                                   atol=1e-6)
        assert np.all(b["loss_mask"][row][b["input_mask"][row] == 0] == 0)
        return
  pytest.fail("no semantic row in 4 batches")


def test_deterministic_by_seed(setup):
  config, tok, records, batches = setup
  again = next(iter(kpt_pipeline.make_kpt_train_dataset(config, tok, records=records)))
  assert all(np.array_equal(again[k], batches[0][k]) for k in again)


def test_unreadable_image_skips_the_element_or_raises_when_strict(setup, tmp_path):
  config, tok, records, batches = setup
  corrupt = tmp_path / "corrupt.jpg"
  corrupt.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
  broken = list(records)
  broken[0] = dataclasses.replace(broken[0], image_path=str(corrupt))
  def counts(cfg):
    it = iter(kpt_pipeline.make_kpt_train_dataset(cfg, tok, records=broken))
    return [next(it)["skipped_images"] for _ in range(4)]
  first = counts(config)
  assert sum(int(c.sum()) for c in first) > 0                # the query or a support
  assert all(np.array_equal(a, b) for a, b in zip(first, counts(config)))   # deterministic
  assert not any(b["skipped_images"].any() for b in batches)   # intact records: none
  strict = config.copy_and_resolve_references()
  strict.data.strict_images = True
  with pytest.raises(ImageError, match="corrupt.jpg"):
    counts(strict)
