"""Entry point ``presets`` of unisd-components: the presets (the paper's recipes) and ``unisd cache negatives``.

Each mechanism is its own entry point, registered by its module (``agreement``, ``clip``, ``contrastive``,
``ema``, ``matching``, ``leak_guard``), so that ``UNISD_DISABLE_PLUGINS`` can leave out any one of them.
"""

from unisd.hookspecs import hookimpl

from .presets import all_presets


@hookimpl
def register_presets(register):
    for preset in all_presets():
        register(preset)


@hookimpl
def register_commands(app):
    from . import cache_cmd

    cache_cmd.register(app)
