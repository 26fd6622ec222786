"""Inference: the decode engine, the keypoint decoders on top of it, answer parsing."""
