# listener: one container beside your database.
#   docker build -t listener .
#   docker run -e DATABASE_URL=postgresql://user:pass@db:5432/app \
#       -e LISTENER_HEALTH_TOKEN="$(openssl rand -hex 24)" -p 127.0.0.1:8080:8080 listener
# Inside the container the health server must bind 0.0.0.0 to be reachable through the
# published port (the daemon's default is 127.0.0.1); publish it on 127.0.0.1 or set a token.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    LISTENER_LOG_JSON=1 \
    LISTENER_HEALTH_HOST=0.0.0.0 \
    LISTENER_HEALTH_PORT=8080

# OpenCV's headless wheel still links against glib.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY listener ./listener
COPY sql ./sql
RUN pip install .

RUN useradd --create-home --uid 10001 listener
USER listener

EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LISTENER_HEALTH_PORT', '8080'), timeout=2)"

ENTRYPOINT ["listener", "run"]
CMD ["--migrate"]
