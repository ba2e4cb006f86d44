"""Unit tests of the export service: its pure domain and its logic over in-memory ports."""
