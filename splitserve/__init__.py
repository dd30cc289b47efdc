"""splitserve: disaggregated prefill/decode LLM serving on Ray."""

__version__ = "0.1.0"
