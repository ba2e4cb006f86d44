"""The Audience services; each subpackage runs alone as ``python -m services.<name>``."""
