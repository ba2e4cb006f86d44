"""The export domain: pure logic, no gRPC, protobuf, asyncpg or network.

CSV rows and escaping, columns, file names and manifests, delta computation, cron in a
time zone, webhook payloads and signatures, and retry backoff.
"""
