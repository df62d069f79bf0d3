"""erasekit: erase concepts from text-to-image diffusion models, as composable safetensors adapters."""

__version__ = "0.1.0"
