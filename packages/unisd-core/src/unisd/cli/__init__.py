"""The ``unisd`` command line (Typer). Build it with :func:`unisd.cli.app.make_app`."""
