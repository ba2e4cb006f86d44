"""The segment engine's PostgreSQL stores: every SQL statement of the service lives here."""
