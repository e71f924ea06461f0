"""Runnable examples: ``python -m attnscope.examples needle|codename``."""
