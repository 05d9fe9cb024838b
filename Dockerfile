# listener: one container beside your database.
#   docker build -t listener .
#   docker run --rm -e DATABASE_URL=postgresql://user:pass@db:5432/app listener migrate
#   docker run -e DATABASE_URL=postgresql://user:pass@db:5432/app \
#       -e LISTENER_HEALTH_TOKEN="$(openssl rand -hex 24)" -p 127.0.0.1:8080:8080 listener
# The entrypoint is the `listener` command: with no arguments the image runs `listener run
# --migrate`; any arguments replace that (`migrate`, `status`, `attach ...`, `run`).
# Inside the container the health server must bind 0.0.0.0 to be reachable through the
# published port (the daemon's default is 127.0.0.1); publish it on 127.0.0.1 or set a token.
# The HEALTHCHECK is part of the Docker image format: with podman or buildah, build with
# `--format docker` to keep it (the OCI format has no health check).
ARG PYTHON_IMAGE=python:3.11-slim

# -- builder: a virtual environment with listener and its dependencies, from wheels ----------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/listener
WORKDIR /src

# The dependencies alone first, read from pyproject.toml: this layer is rebuilt only when they
# change, not on every change of the code.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt \
    && /opt/listener/bin/pip install -r requirements.txt
# face-recognition-models ships four dlib models; the faces step uses two. The other two (the
# 68-point landmarks, 100 MB, and the CNN detector) are left out of the image.
RUN rm /opt/listener/lib/python3*/site-packages/face_recognition_models/models/shape_predictor_68_face_landmarks.dat \
        /opt/listener/lib/python3*/site-packages/face_recognition_models/models/mmod_human_face_detector.dat

COPY README.md ./
COPY listener ./listener
COPY sql ./sql
# pip and setuptools are not needed to run listener: the final image does without them.
RUN /opt/listener/bin/pip install --no-deps . \
    && /opt/listener/bin/pip uninstall -y -q pip setuptools

# -- the image: the base plus the virtual environment, run as an unprivileged user -----------
FROM ${PYTHON_IMAGE}

ENV PATH=/opt/listener/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LISTENER_LOG_JSON=1 \
    LISTENER_HEALTH_HOST=0.0.0.0 \
    LISTENER_HEALTH_PORT=8080

COPY --from=builder /opt/listener /opt/listener
RUN useradd --create-home --uid 10001 listener
USER listener
WORKDIR /home/listener

EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LISTENER_HEALTH_PORT', '8080'), timeout=2)"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["listener"]
CMD ["run", "--migrate"]
