"""Entry point of unisd-components: registers each mechanism, the presets and ``unisd cache negatives``."""

from unisd.hookspecs import hookimpl

from .agreement import Agreement
from .clip import Clip
from .contrastive import Contrastive
from .ema import Ema
from .matching import Matching
from .presets import all_presets

COMPONENTS = (Agreement, Clip, Contrastive, Ema, Matching)


@hookimpl
def register_components(register):
    for cls in COMPONENTS:
        register(cls)


@hookimpl
def register_presets(register):
    for preset in all_presets():
        register(preset)


@hookimpl
def register_commands(app):
    from . import cache_cmd

    cache_cmd.register(app)
