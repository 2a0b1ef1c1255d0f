# One non-root image for every hermes-media process:
#   docker run IMAGE                      serves both routes (clip :8001, compress :8002)
#   docker run IMAGE hermes-media worker  runs an arq worker for clip jobs (needs HERMES_REDIS_URL)
# Every Python package is the version uv.lock pins (yt-dlp with deno and yt-dlp-ejs, ffmpeg from
# the imageio-ffmpeg wheel). Needs BuildKit (Docker 23+, or DOCKER_BUILDKIT=1 on older engines).
#
# BASE_IMAGE: any Debian-based image with python3 (3.11+) and its venv module. Where no registry
# answers, tests/image/debian-base.sh makes one from Debian packages.
# Behind a TLS-inspecting proxy, give the build the CA bundle as a secret: it is mounted for the
# install step only and stored in no layer:
#   docker build --secret id=ca-bundle,src="$PIP_CERT" .
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG UV_VERSION=0.13.9
ENV UV_SYSTEM_CERTS=true UV_PYTHON_DOWNLOADS=never UV_PROJECT_ENVIRONMENT=/app/.venv \
    UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml uv.lock README.md ./
COPY services ./services
RUN --mount=type=secret,id=ca-bundle --mount=type=cache,target=/root/.cache \
    if [ -s /run/secrets/ca-bundle ]; then \
        export SSL_CERT_FILE=/run/secrets/ca-bundle PIP_CERT=/run/secrets/ca-bundle; \
    fi \
    && python3 -m venv /opt/uv \
    && /opt/uv/bin/pip install --quiet "uv==${UV_VERSION}" \
    && /opt/uv/bin/uv sync --locked --no-editable --python python3

FROM ${BASE_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/app/.venv/bin:$PATH
COPY --from=build /app/.venv /app/.venv
RUN useradd --create-home --uid 10001 hermes \
    && mkdir -p /tmp/hermes-clip && chown hermes /tmp/hermes-clip
USER hermes
WORKDIR /home/hermes
EXPOSE 8001 8002
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8002/healthz')"
CMD ["hermes-media", "serve", "--host", "0.0.0.0"]
