"""Ingest: accepts events, validates and de-duplicates them, and appends them to the bus."""
