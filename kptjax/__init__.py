"""kptjax: multimodal-LLM keypoint localization in JAX/Flax.

Subpackages: ``keypoints`` (body models), ``data`` (readers, transforms, conversations,
Grain pipelines), ``models`` (ViT, projector, Llama+LoRA, VLM), ``convert`` (Hugging Face
checkpoints), and the ``train`` / ``evaluate`` / ``predict`` entry points.
"""

__version__ = "0.1.0"
