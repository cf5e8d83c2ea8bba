"""Framework integrations. ``prism.integrations.hf``: Hugging Face transformers (imported lazily,
transformers is optional)."""
