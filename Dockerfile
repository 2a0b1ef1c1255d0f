# One non-root image for every hermes-media process:
#   docker run IMAGE                      serves both routes (clip :8001, compress :8002)
#   docker run IMAGE hermes-media worker  runs an arq worker for clip jobs (needs HERMES_REDIS_URL)
# ffmpeg comes from the imageio-ffmpeg wheel. For real YouTube, yt-dlp needs a JavaScript runtime
# (deno, from PyPI) and yt-dlp-ejs; every version is pinned so the resolver cannot quietly fall
# back to an older yt-dlp.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY services ./services
RUN pip install . "yt-dlp[default]==2026.10.26" "yt-dlp-ejs==0.8.0" "deno==2.9.8" \
    && useradd --create-home --uid 10001 hermes \
    && mkdir -p /tmp/hermes-clip && chown hermes /tmp/hermes-clip
USER hermes
EXPOSE 8001 8002
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8002/healthz')"
CMD ["hermes-media", "serve", "--host", "0.0.0.0"]
