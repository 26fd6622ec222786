"""Evaluation: metrics (OKS AP, PCK/PCKh, MPJPE) and provenance of results."""
