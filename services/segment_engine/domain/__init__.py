"""The segment engine's domain: what a change can affect, evaluation, cascades, roll-ups,
timers and resume tokens. Pure: no gRPC, protobuf, asyncpg or Redis here."""
