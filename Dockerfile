# The pyexec service image. Build it with scripts/build-image.sh, which puts pyexec's wheel
# and its pinned dependency wheels in build/image/wheels first: the build itself needs no
# network. BASE_IMAGE must provide python3 with the venv module (and pip for the build stage).
ARG BASE_IMAGE=python:3.12-slim

FROM ${BASE_IMAGE} AS build
# Lets scripts/build-image.sh remove this stage's leftovers, and nothing else.
LABEL pyexec.build-stage=true
COPY build/image/wheels/ /wheels/
# --no-deps: the wheel set is the lock, resolved on the host; `pip check` proves it complete.
# /docs serves Swagger UI only: the bundled Swagger Editor and source maps are 20 MB of dead weight.
RUN python3 -m venv /opt/pyexec \
 && /opt/pyexec/bin/python3 -m pip install -q --no-index --no-deps --no-cache-dir \
      --disable-pip-version-check /wheels/*.whl \
 && /opt/pyexec/bin/python3 -m pip check --disable-pip-version-check \
 && /opt/pyexec/bin/python3 -m pip uninstall -q -y --disable-pip-version-check pip setuptools \
 && find /opt/pyexec -path '*/swagger_ui/static/*' \( -name 'swagger-editor*' -o -name '*.map' \) \
      -delete \
 && /opt/pyexec/bin/python3 -c "import pyexec.api.server"

FROM ${BASE_IMAGE}
# A fixed, unprivileged uid; in embedded mode add the Docker socket's group at run time
# (`--group-add <gid>`), see docs/security.md.
RUN groupadd --system --gid 10001 pyexec \
 && useradd --system --uid 10001 --gid pyexec --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin pyexec
COPY --from=build /opt/pyexec /opt/pyexec
ENV PATH=/opt/pyexec/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYEXEC_HOST=0.0.0.0 \
    PYEXEC_PORT=8080
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080
# Liveness only: /health also checks the backends, which is the orchestrator's concern.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PYEXEC_PORT', '8080') + '/health/live', timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["pyexec"]
CMD ["serve"]
