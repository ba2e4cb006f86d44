# syntax=docker/dockerfile:1
#
# One image for every Audience service: `docker run IMAGE ingest` runs that service,
# `docker run IMAGE audience migrate` runs any command of the installed distribution.
# Build: docker build -t audience:dev .   (BuildKit, the default builder since Docker 23:
# the cache mounts and COPY --chmod need it.)

# Both stages use the same base so that the virtualenv built in the first one (whose
# interpreter is a symlink to /usr/local/bin/python3.11) runs unchanged in the second.
# Release builds should pin it by digest: --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:...
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN python -m venv /opt/audience

WORKDIR /src

# Dependencies first, read from pyproject.toml alone, so that a code change reuses this layer.
# Wheels only: every pinned dependency ships one for CPython 3.11 on manylinux, and refusing
# sdists means no compiler is needed in either stage.
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"], sep="\n")' \
        > /tmp/requirements.txt \
    && /opt/audience/bin/pip install --no-compile --only-binary=:all: --requirement /tmp/requirements.txt

COPY README.md ./
COPY libs ./libs
COPY services ./services
# Bytecode is compiled here because the runtime file system is read-only. unchecked-hash
# .pyc files stay valid whatever timestamps the layer copy leaves: the sources never change
# inside an image.
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/audience/bin/pip install --no-compile --no-deps . \
    && /opt/audience/bin/python -m compileall -q -j 0 --invalidation-mode unchecked-hash /opt/audience/lib


FROM ${PYTHON_IMAGE} AS runtime

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="audience" \
      org.opencontainers.image.description="Real-time audience segments as async gRPC services" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"

ENV PATH=/opt/audience/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    AUDIENCE_LISTEN=0.0.0.0:50051 \
    AUDIENCE_EXPORT_ROOT=/var/lib/audience/exports

# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
# The standard library is compiled too: with PYTHONDONTWRITEBYTECODE and a read-only root,
# nothing would ever cache it and every start would recompile what it imports.
RUN groupadd --system --gid 10001 audience \
    && useradd --system --uid 10001 --gid audience --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin audience \
    && install --directory --owner=10001 --group=10001 --mode=0750 /var/lib/audience/exports \
    && python -m compileall -q -j 0 --invalidation-mode unchecked-hash /usr/local/lib/python3.11

COPY --from=build /opt/audience /opt/audience
COPY --chmod=0755 scripts/container-entrypoint.sh /usr/local/bin/audience-entrypoint

USER 10001:10001
WORKDIR /var/lib/audience

EXPOSE 50051

# No HEALTHCHECK: orchestrators probe grpc.health.v1 on port 50051 themselves (Kubernetes'
# native grpc probes), and a Docker HEALTHCHECK would need a gRPC client in the image.
ENTRYPOINT ["/usr/local/bin/audience-entrypoint"]
CMD ["ingest"]
