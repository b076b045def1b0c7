# One image for every meshserve service; compose picks the service by command
# (`python -m services.<name>`).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MESHSERVE_CACHE_DIR=/var/cache/meshserve \
    MESHSERVE_HEALTH_FILE=/tmp/meshserve-health.json

WORKDIR /app
COPY . /app

# Extra pip arguments for builds without the public index (e.g. a local wheel
# folder: --find-links /app/.wheels). Empty for a normal build.
ARG PIP_EXTRA_ARGS=""
RUN pip install $PIP_EXTRA_ARGS /app && rm -rf /app/.wheels

# Generate the embedded default model at build time, so every container of the
# mesh serves byte-identical weights and tokenizer.
RUN python -m shared.embedded_model

ENTRYPOINT ["python", "-m"]
CMD ["services.api"]
