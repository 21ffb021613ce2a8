"""The `imagen` command: parse, call, print. The work lives in importable modules.

Exit codes: 0 ok; 1 the work failed (a permanent error, a job that did not end
done); 2 bad usage; 75 a transient failure that outlasted its retries (a server
that does not answer); 78 bad configuration (an unknown database or role, a
malformed URL, a schema never migrated, a missing key, an unknown backend or
preset). Errors print as one line on stderr, never a traceback.
"""

from __future__ import annotations

import click

from imagen import __version__
from imagen.cli.exits import EXIT_CONFIG, EXIT_FAILED, EXIT_TEMPFAIL, fail, handle_errors


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="imagen")
def main() -> None:
    """imagen: turn prompts, and rows in imagen.jobs, into generated images.

    Configuration comes from IMAGEN_* environment variables and a .env file in
    the current directory (see .env.example). Exit codes: 0 ok, 1 failed,
    2 bad usage, 75 temporary failure, 78 bad configuration.
    """


def _register() -> None:
    from imagen.cli import bench, db, generate, jobs, pipeline, presets, web

    main.add_command(generate.generate)
    main.add_command(db.db)
    main.add_command(jobs.jobs)
    main.add_command(pipeline.listen)
    main.add_command(pipeline.smoke)
    main.add_command(pipeline.demo)
    main.add_command(bench.bench)
    main.add_command(presets.presets)
    main.add_command(web.web)


_register()

__all__ = ["EXIT_CONFIG", "EXIT_FAILED", "EXIT_TEMPFAIL", "fail", "handle_errors", "main"]
