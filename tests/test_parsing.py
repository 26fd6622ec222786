"""Answer parsing, LocLLM confidences and the coordinate grammar on a toy vocabulary."""

import numpy as np
import pytest

from kptjax import errors
from kptjax.inference import parsing

# A toy vocabulary: special tokens, single characters, a few merged pieces, junk.


# A toy vocabulary: special tokens, single characters, a few merged pieces, junk.
TOY = [None, None, "[", " [", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", ".", ",",
       "]", "0.", "12", " ", "a", "Answer", "]]", ", "]
EOS = 1
ID = {s: i for i, s in enumerate(TOY) if s is not None}


def _ids(*pieces):
  return [ID[p] for p in pieces]


def test_parse_values_locllm_regex():
  values, spans = parsing.parse_values("[0.412,0.733]", 2)
  np.testing.assert_allclose(values, [0.412, 0.733])
  assert spans == [(1, 6), (7, 12)]
  assert parsing.parse_values("[0.4,0.7,0.123456]", 3)[0].tolist() == pytest.approx(
      [0.4, 0.7, 0.123456])
  assert parsing.parse_values("garbage 0.5", 2)[0] is None      # one value: failure
  assert parsing.parse_values("[1.2,0.3,0.4]", 2)[0].tolist() == pytest.approx([0.3, 0.4])


def test_shape_from_example():
  assert parsing.shape_from_example("[0.500,0.250]</s>") == "[0.ddd,0.ddd]"
  assert parsing.shape_from_example(" [0.500,0.250,0.500000]") == "[0.ddd,0.ddd,0.dddddd]"
  assert parsing.num_values("decimal3d") == 3
  with pytest.raises(errors.ConfigError):
    parsing.num_values("polar")


def test_score_answer_mean_max_prob_of_number_tokens():
  toks = _ids(" [", "0", ".", "4", "1", ",", "0.", "7", "]") + [EOS, EOS]
  probs = [0.9, 1.0, 1.0, 0.5, 0.7, 0.8, 0.9, 0.3, 0.9, 0.99, 0.1]
  ans = parsing.score_answer(toks, probs, TOY, EOS, 2)
  assert ans.ok and ans.text == " [0.41,0.7]"
  np.testing.assert_allclose(ans.values, [0.41, 0.7])
  x_score = np.mean([1.0, 1.0, 0.5, 0.7])     # tokens '0' '.' '4' '1'
  y_score = np.mean([0.9, 0.3])               # tokens '0.' '7'
  assert ans.score == pytest.approx((x_score + y_score) / 2)


def test_score_answer_unparseable_scores_zero():
  ans = parsing.score_answer(_ids("a", "Answer", "0.") + [EOS], [0.9] * 4, TOY, EOS, 2)
  assert not ans.ok and ans.score == 0.0 and ans.values.tolist() == [0.0, 0.0]


def test_to_image_coords_inverse_affine():
  # crop pixels -> original: scale 2, shift (10, 20).
  affine_inv = np.array([[2.0, 0, 10], [0, 2.0, 20]])
  out = parsing.to_image_coords(np.array([[0.5, 0.25], [0.0, 1.0]]), affine_inv, 64)
  np.testing.assert_allclose(out, [[74, 52], [10, 148]])
  assert parsing.depth_from_value(np.array([0.5, 0.75])).tolist() == [0.0, 500.0]


def _walk(grammar, tokens):
  state = grammar.start
  for t in tokens:
    state = grammar.transitions[state, t]
    if state < 0:
      return -1
  return state


def test_grammar_accepts_valid_and_rejects_invalid():
  g = parsing.build_grammar(TOY, "[0.ddd,0.ddd]", EOS)
  assert _walk(g, _ids(" [", "0", ".", "4", "1", "2", ",", "0.", "12", "3", "]") + [EOS]) >= 0
  assert _walk(g, _ids("[", "0.", "9", "9", "9", ", ") ) < 0           # space after comma
  assert _walk(g, _ids("[", "1")) < 0                                  # leading digit must be 0
  assert _walk(g, _ids("[", "0.", "1", "2", "]")) < 0                  # too few digits
  assert _walk(g, _ids(" ", "[", "0.")) >= 0                           # single leading space
  assert _walk(g, _ids(" ", " [")) < 0
  # EOS only after the closing bracket, and it repeats afterwards.
  full = _ids("[", "0.", "12", "3", ",", "0.", "4", "5", "6", "]")
  assert g.transitions[_walk(g, full[:-1]), EOS] < 0
  done = _walk(g, full + [EOS])
  assert g.transitions[done, EOS] == done
  assert (g.transitions[done] >= 0).sum() == 1
  assert (g.transitions[:, 0] < 0).all()                                # special tokens never


def test_grammar_random_walks_always_parse():
  """Any path through the automaton that reaches EOS parses, with the shape's digits."""
  g = parsing.build_grammar(TOY, "[0.ddd,0.ddd]", EOS)
  rng = np.random.default_rng(0)
  for _ in range(200):
    state, toks = g.start, []
    while len(toks) < g.max_tokens + 2:
      allowed = np.flatnonzero(g.transitions[state] >= 0)
      assert allowed.size, "dead end"
      t = int(rng.choice(allowed))
      toks.append(t)
      state = g.transitions[state, t]
      if t == EOS:
        break
    assert toks[-1] == EOS, "did not finish within max_tokens"
    ans = parsing.score_answer(toks, np.ones(len(toks)), TOY, EOS, 2)
    assert ans.ok, ans.text
    assert len(ans.text.strip()) == len("[0.123,0.456]")


def test_grammar_missing_character_is_a_clear_error():
  with pytest.raises(errors.ConfigError, match="character"):
    parsing.build_grammar([s if s != "]" and s != "]]" else None for s in TOY],
                          "[0.ddd,0.ddd]", EOS)


def test_loc_token_grammar_and_parse():
  vocab, eos = 12, 1
  loc_ids = {5: 0, 6: 1, 7: 2, 8: 3}                 # <loc_0>..<loc_3> at ids 5..8
  g = parsing.build_loc_grammar(sorted(loc_ids), vocab, eos)
  assert _walk(g, [6, 8, eos, eos]) >= 0
  assert _walk(g, [6, eos]) < 0 and _walk(g, [6, 7, 8]) < 0 and _walk(g, [2]) < 0
  ans = parsing.score_loc_answer([6, 8, eos], [0.5, 0.7, 0.9], loc_ids, eos, loc_bins=4)
  assert ans.ok and ans.text == "<loc_1><loc_3>"
  np.testing.assert_allclose(ans.values, [1.5 / 4, 3.5 / 4])
  assert ans.score == pytest.approx(0.6)
  assert not parsing.score_loc_answer([6, eos], [0.5, 0.5], loc_ids, eos, 4).ok


def test_localize_unparseable_is_missing_never_the_crop_centre():
  """Two persons x two queries; one answer does not parse: it is missing, its values
  are 0 (finite), and the parsed ones map back through their own affine."""
  strs = [None, "[", "]", ",", "0", ".", "1", "2", "5", "x"]
  eos = 0
  ans = {"good": [1, 4, 5, 8, 3, 4, 5, 6, 7, 2, eos], "bad": [9, 9, eos]}   # [0.5,0.12] / xx
  rows = [["good", "bad"], ["good", "good"]]
  width = max(len(a) for a in ans.values())
  tokens = np.full((2, 2, width), eos, np.int32)
  for i, row in enumerate(rows):
    for j, name in enumerate(row):
      tokens[i, j, :len(ans[name])] = ans[name]
  probs = np.ones(tokens.shape, np.float32)
  affine = np.array([[[2, 0, 10], [0, 2, 20]], [[1, 0, 0], [0, 1, 0]]], np.float32)
  scorer = lambda t, p: parsing.score_answer(t, p, strs, eos, 2)
  loc = parsing.localize(tokens, probs, scorer, 2, affine, 32)
  assert loc.missing.tolist() == [[False, True], [False, False]] and loc.num_failures == 1
  assert loc.keypoints[0, 1].tolist() == [0.0, 0.0] and loc.values[0, 1].tolist() == [0, 0]
  assert loc.scores[0, 1] == 0.0 and np.isfinite(loc.keypoints).all()
  np.testing.assert_allclose(loc.keypoints[0, 0], [0.5 * 32 * 2 + 10, 0.12 * 32 * 2 + 20],
                             rtol=1e-6)
  np.testing.assert_allclose(loc.keypoints[1, 1], [16.0, 0.12 * 32], rtol=1e-6)
  assert loc.ok.tolist() == (~loc.missing).tolist()
