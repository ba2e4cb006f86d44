"""Audience: real-time audience segments as a suite of async gRPC services."""
