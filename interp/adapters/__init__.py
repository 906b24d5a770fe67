"""LoRA adapters: train, library, merge, route, adapter-aware hooks."""
