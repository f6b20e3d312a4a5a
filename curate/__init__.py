"""curate: instruction-dataset curation with a bundled QLoRA trainer to prove each change."""

__version__ = "0.1.0"
