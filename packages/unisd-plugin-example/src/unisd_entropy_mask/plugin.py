"""The module named by this distribution's ``unisd`` entry point."""

from unisd import hookimpl

from .component import EntropyMask


@hookimpl
def register_components(register):
    register(EntropyMask)
