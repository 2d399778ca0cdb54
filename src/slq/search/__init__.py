"""The SLQ search: a bank of quantized choices, measured sensitivities, an exact allocation, verification."""

from .session import SearchSession, search

__all__ = ["SearchSession", "search"]
