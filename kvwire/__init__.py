"""kvwire: networked KV-cache streaming for LLM applications."""

from kvwire._version import __version__

__all__ = ["__version__"]
