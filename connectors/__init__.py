"""Engine adapters: transformers (``hf``), later vLLM and SGLang."""
