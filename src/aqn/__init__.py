"""aqn: GRPO post-training with Adaptive Quantization Noise."""

__version__ = "0.1.0"
