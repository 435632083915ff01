"""Model adapters: one file per HF VLM family, registered in ``vtprune.registry.ADAPTERS``."""
