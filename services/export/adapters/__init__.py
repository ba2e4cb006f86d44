"""Adapters of the export service: peers over gRPC, folders, SFTP and HTTP."""
