"""Entry point of unisd-components: registers each mechanism and the presets."""

from unisd.hookspecs import hookimpl


@hookimpl
def register_components(register):
    """Components land here one module at a time (see the components issue)."""
