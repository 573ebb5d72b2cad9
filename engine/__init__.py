"""stc-engine: compress speech-translation audio-language models by layer pruning, QLoRA and KD."""

__version__ = "0.1.0"
