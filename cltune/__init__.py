"""cltune: continual, parameter-efficient fine-tuning of LLMs."""

__version__ = "0.1.0"
