"""orstack: composable commands for compressing, fine-tuning and routing small language models."""

__version__ = "0.1.0"
