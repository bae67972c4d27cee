"""The module named by this distribution's ``unisd`` entry point."""

from unisd.hookspecs import hookimpl

from .component import EntropyMask


@hookimpl
def register_components(register):
    register(EntropyMask)
