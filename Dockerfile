# The zstack-mn image: management node, migration job, CLI and simulated agent in one.
#   docker build -t zstack-mn .
# PYTHON_IMAGE is the base: the official image by default; any image with Python ≥ 3.11 and pip on
# PATH will do (the compose tests build one from Debian's packages, see tests/compose/).
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

# The dependencies first, from pyproject.toml alone, so that a change to the code (or the README)
# reuses this layer instead of downloading them again.
COPY pyproject.toml ./
RUN mkdir zstack_mn && touch zstack_mn/__init__.py README.md \
 && pip install . \
 && pip uninstall -y zstack-mn \
 && rm -rf zstack_mn README.md build ./*.egg-info

COPY README.md alembic.ini ./
COPY zstack_mn ./zstack_mn
RUN pip install --no-deps . && rm -rf build ./*.egg-info

# An unprivileged user: the node needs no root inside the container (its home keeps the embedded
# mode's SQLite file when no database URL is given).
RUN useradd --system --create-home --home-dir /home/zstack --shell /usr/sbin/nologin zstack
USER zstack

LABEL org.opencontainers.image.title=zstack-mn
ENV ZSTACK_MN_HTTP_HOST=0.0.0.0 ZSTACK_MN_LOG_FORMAT=json
EXPOSE 8080
ENTRYPOINT ["zstack-mn"]
CMD ["start"]
