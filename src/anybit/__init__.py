"""anybit: compress language models to any bit budget with mixed-precision, non-uniform PTQ."""

from anybit.errors import AnybitError

__version__ = "0.1.0"

__all__ = ["AnybitError", "__version__"]
