"""anybit: compress language models to any bit budget with mixed-precision, non-uniform PTQ."""

from anybit.errors import AnybitError
from anybit.formats import hf as _hf
from anybit.formats.checkpoint import load

__version__ = "0.1.0"

_hf.register()  # transformers' from_pretrained now loads packed anybit checkpoints

__all__ = ["AnybitError", "__version__", "load"]
