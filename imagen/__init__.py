"""imagen: rows in imagen.jobs become generated images.

The package is importable without any server configured; only the commands that
need PostgreSQL or Redis ask for them.
"""

__version__ = "0.1.0"
