"""SQL migrations of the segment_engine schema, applied in order by audience.db.migrate."""
