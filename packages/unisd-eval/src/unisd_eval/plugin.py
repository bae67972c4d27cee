"""Entry point of unisd-eval: registers the benchmark tasks and the ``unisd eval`` command."""

from unisd.hookspecs import hookimpl


@hookimpl
def register_tasks(register):
    """Every benchmark task of the method (mbpp, humaneval, scienceqa, cos_e, medmcqa, gpqa, gsm8k, tooluse)."""
    from .tasks import ALL_TASKS

    for task in ALL_TASKS:
        register(task)


@hookimpl
def register_commands(app):
    """``unisd eval TASK``: it finds tasks through the plugin manager in ``ctx.obj``."""
    from .cli import eval_command

    app.command("eval")(eval_command)
