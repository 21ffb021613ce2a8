"""`imagen web`: the operator dashboard, a small Starlette app over imagen.jobs.

It reads the tables through `imagen.jobs_admin` (the queries `imagen jobs` runs)
and a few queries of its own (`imagen.web.queries`); it changes a job only the
way `imagen jobs retry/cancel` do, through the same functions. It must never
serve anything without its token when one is required, never act on a GET, and
never load a script from outside the package.
"""

from imagen.web.app import WebOptions, create_app

__all__ = ["WebOptions", "create_app"]
