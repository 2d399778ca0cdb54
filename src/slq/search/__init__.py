"""The SLQ search: a bank of quantized choices, measured sensitivities, an exact allocation, verification."""

from .config import SearchConfig
from .session import SearchSession, search

__all__ = ["SearchConfig", "SearchSession", "search"]
