"""SQL migrations of the export schema, applied in order by audience.db.migrate."""
