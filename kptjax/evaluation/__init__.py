"""Evaluation: ``runner.run`` (one run behind ``python -m kptjax.evaluate``), ``loading``
(config, model, params, tokenizer, records), ``protocols`` (the registry: how each dataset
kind is scored), ``persons`` (the 'keypoints' task), ``prompted`` (MP-100 visual /
textual / semantic), ``results`` (files, provenance, partial predictions), ``metrics`` and
``oks`` (PCK / PCKh / MPJPE, OKS AP), ``provenance``."""
