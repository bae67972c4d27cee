"""Operations around training runs: the preflight ``doctor``, results ``report`` and the ``sweep`` orchestrator.

Each module is plain library code (typed errors, no printing of its own); the Typer commands in
``unisd.cli.{doctor,report,sweep}_cmd`` are thin wrappers around it.
"""
