# One image for every meshserve service; compose picks the service by command
# (`python -m services.<name>`).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MESHSERVE_CACHE_DIR=/var/cache/meshserve \
    MESHSERVE_HEALTH_FILE=/tmp/meshserve-health.json

WORKDIR /app

# Extra pip arguments for builds without the public index (e.g. a local wheel
# folder: --find-links /wheels). Empty for a normal build.
ARG PIP_EXTRA_ARGS=""

# Dependencies first, from pyproject.toml alone: a code change then rebuilds only
# the small layers below, not the torch install.
COPY pyproject.toml /app/
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install $PIP_EXTRA_ARGS -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY . /app
RUN pip install $PIP_EXTRA_ARGS --no-deps /app

# Generate the embedded default model at build time, so every container of the
# mesh serves byte-identical weights and tokenizer.
RUN python -m shared.embedded_model

# Services run as an unprivileged user that owns only what they write (the cache;
# the health file and tts engine sockets go to /tmp). The uid must be able to read
# the mesh's CURVE keys, which compose mounts with the host file's owner and mode
# (0600): build with MESHSERVE_UID=$(id -u) if yours is not 1000.
ARG MESHSERVE_UID=1000
RUN useradd --uid "$MESHSERVE_UID" --user-group --create-home --shell /usr/sbin/nologin \
        meshserve \
    && chown -R meshserve:meshserve "$MESHSERVE_CACHE_DIR"
USER meshserve

ENTRYPOINT ["python", "-m"]
CMD ["services.api"]
