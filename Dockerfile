# One image for every hermes-media process; the default command serves both routes.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY services ./services
RUN pip install . && useradd --create-home --uid 10001 hermes
USER hermes
EXPOSE 8001 8002
CMD ["hermes-media", "serve", "--host", "0.0.0.0"]
