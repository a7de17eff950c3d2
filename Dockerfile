# One image for both services: `python -m receiver` (the default) or `python -m worker`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# The locked versions first, with their hashes: a rebuild installs what was tested.
COPY requirements/runtime.txt ./requirements/
RUN pip install --require-hashes -r requirements/runtime.txt
COPY pyproject.toml README.md ./
COPY common ./common
COPY receiver ./receiver
COPY worker ./worker
COPY admin ./admin
COPY shopapi ./shopapi
RUN pip install --no-deps --no-build-isolation . \
    && useradd --system --no-create-home --uid 10001 app

USER app
EXPOSE 8080 8081 8082 9101
CMD ["python", "-m", "receiver"]
