# fl-sim on Flower's deployment engine: one image for every flower-* process (SuperLink,
# SuperExec, SuperNode) and for `fl-sim` itself. See docker-compose.yml.
#
#   docker build -t fl-sim .
#   docker run --rm fl-sim flower-superlink --help
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # else the SuperLink would `uv sync` a venv per run (docs/design.md, Running Flower); the
    # image already holds every dependency
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_HOME=/home/flower/.flwr \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    FL_SIM_CACHE=/home/flower/cache

# torch first, from the CPU index: `pip install .` would otherwise resolve the multi-GB CUDA
# build (pyproject pins torch==2.13.0, which 2.13.0+cpu satisfies).
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /app
COPY pyproject.toml README.md ./
COPY fl_sim fl_sim
COPY clients clients
COPY strategies strategies
RUN pip install . && rm -rf build *.egg-info

# Not root: the SuperLink's key is mounted read-only, results go to a named volume.
RUN useradd --create-home --uid 1000 flower \
    && mkdir -p /app/results /home/flower/cache /home/flower/.flwr \
    && chown -R flower:flower /app /home/flower
USER flower

# The Fleet/Control/Runtime port of a SuperLink, and a SuperNode's Runtime (ClientApp) port.
EXPOSE 9093 9094
CMD ["flower-superlink", "--help"]
