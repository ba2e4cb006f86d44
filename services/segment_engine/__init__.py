"""Segment engine: segment definitions, real-time memberships and the change stream."""
