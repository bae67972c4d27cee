"""An example third-party unisd plugin: the ``entropy-mask`` component."""

from .component import EntropyMask

__all__ = ["EntropyMask"]
