"""SQL migrations of the ingest schema, applied in order by audience.db.migrate."""
