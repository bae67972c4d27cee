"""Entry point of unisd-eval: registers the benchmark tasks and the ``unisd eval`` command."""

from unisd.hookspecs import hookimpl


@hookimpl
def register_tasks(register):
    """Tasks land here one module at a time (see the evaluation issue)."""
