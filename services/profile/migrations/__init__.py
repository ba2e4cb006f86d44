"""SQL migrations of the profile schema, applied in order by audience.db.migrate."""
