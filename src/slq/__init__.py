"""slq: statistically-lossless quantization of Hugging Face causal LLMs."""

__version__ = "0.1.0"
