"""Inference: the decode engine (``generate``), the one ``decode.Decoder`` and the
``Localizer`` on top of it, the prompts (``prompts``), answer parsing (``parsing``)."""
