"""Model code: layers, LoRA, the ViT and Llama towers, the projector and the composite VLM."""
