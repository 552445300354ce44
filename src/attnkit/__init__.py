"""attnkit: every way of computing multi-head attention behind one verified interface."""

from attnkit.call import UnsupportedError
from attnkit.functional import attention, available
from attnkit.module import KVCache, MultiHeadAttention

__version__ = "0.1.0"

__all__ = [
    "KVCache", "MultiHeadAttention", "UnsupportedError", "attention", "available", "__version__"
]
