"""pgwarden: a PostgreSQL wire-protocol proxy that enforces data-access policy."""

__version__ = "0.1.0"
