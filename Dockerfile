# poolkeeper's image: gunicorn serving the webhook over TLS on 8443, as non-root, with no build
# tools. Build: docker build -t poolkeeper:dev .   (make kind-deploy does)
# The Python base is a tag, not a digest: pin `@sha256:...` (docker buildx imagetools inspect)
# where builds must be reproducible.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# Every dependency at the exact version of requirements.lock, wheels only (no compiler needed
# or present), into a prefix the final stage copies.
COPY requirements.lock /tmp/requirements.lock
RUN pip install --prefix=/install --no-deps --only-binary=:all: -r /tmp/requirements.lock
# poolkeeper itself, without dependencies (the lock's are above), into /app: its code (/app/app)
# and its metadata (/app/poolkeeper-*.dist-info), so importlib.metadata and the
# poolkeeper_build_info metric know its version. The build backend is pinned and stays in this
# stage. rules/ sits beside the package, where the loader finds the shipped rules (the Deployment
# mounts its ConfigMap over POOLKEEPER_RULES_DIR instead).
COPY pyproject.toml setup.cfg README.md /src/
COPY app /src/app
RUN pip install --no-deps --only-binary=:all: setuptools==84.2.1 \
 && pip install --no-deps --no-build-isolation --no-compile --target=/app /src
COPY rules /app/rules
# Bytecode now: the root filesystem is read-only at run time. Hash-checked, so it stays valid
# whatever mtimes the copy below gives the sources.
RUN python -m compileall -q --invalidation-mode unchecked-hash /app/app /install/lib

FROM ${PYTHON_IMAGE}
# pip, setuptools and wheel are build tools: the running image has no use for them.
RUN python -m pip uninstall --yes --quiet pip setuptools wheel \
 && groupadd --gid 10001 poolkeeper \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin poolkeeper
COPY --from=build /install /usr/local
COPY --from=build /app /app
ENV PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    POOLKEEPER_CERT_DIR=/etc/poolkeeper/tls
WORKDIR /app
USER 10001:10001
EXPOSE 8443
# Settings are POOLKEEPER_* variables (README); app.server.conf reads them. The CLI is there
# too: docker run --rm --entrypoint python IMAGE -m app --help
ENTRYPOINT ["gunicorn", "-c", "python:app.server.conf"]
