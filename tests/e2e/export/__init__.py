"""The export service over gRPC, with the real segment engine and profile service."""
