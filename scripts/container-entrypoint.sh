#!/bin/sh
# The container image's entrypoint. `IMAGE ingest` (or profile, segment_engine, export)
# runs that service; anything else runs as given, such as `IMAGE audience migrate`.
# exec leaves the service as PID 1, so the kubelet's SIGTERM reaches its graceful shutdown
# (health NOT_SERVING, drain, stop) with no shell in between to swallow it.
set -eu

case "${1:-}" in
  ingest | profile | segment_engine | export)
    service=$1
    shift
    exec python -m "services.$service" "$@"
    ;;
  "")
    echo "usage: IMAGE {ingest|profile|segment_engine|export} | IMAGE COMMAND [ARG...]" >&2
    exit 64
    ;;
  *)
    exec "$@"
    ;;
esac
