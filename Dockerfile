# One image for every service role (api, worker, migrate); docker-compose.yml picks the command.
# TORCH_INDEX: the CPU wheel index by default (small image); build with
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124   for the GPU workers.
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    NCS_DATA_DIR=/data NCS_HOST=0.0.0.0 NCS_PORT=8000

RUN useradd --create-home --uid 1000 ncs && mkdir -p /data && chown ncs /data
WORKDIR /app

# torch first (its own layer: it changes rarely and is large)
RUN pip install "torch>=2.2" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md ./
COPY ncengine ncengine
COPY api api
COPY worker worker
COPY db db
COPY migrations migrations
COPY ncservice ncservice
RUN pip install .

USER ncs
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s \
  CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)" || exit 1
CMD ["ncservice", "api"]
