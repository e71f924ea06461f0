"""attnscope: LLM serving with exact per-request attention capture."""

__version__ = "0.1.0"
