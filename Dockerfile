# fl-sim on Flower's deployment engine: one image for every flower-* process (SuperLink,
# SuperExec, SuperNode) and for `fl-sim` itself. See docker-compose.yml and README, "Deployment".
#
#   docker build -t fl-sim .                                  # online: from the package index
#   bash scripts/make_wheelhouse.sh                           # offline (air-gapped): wheels first,
#   docker build -t fl-sim .                                  #   then no index is reached
#   bash scripts/make_base_image.sh fl-sim-base:bookworm      # no image registry either:
#   docker build --build-arg BASE_IMAGE=fl-sim-base:bookworm -t fl-sim .
#   docker run --rm fl-sim flower-superlink --help
#
# BASE_IMAGE: any image with Python 3.11 and its venv module (python:3.11-slim, or the Debian
# image of scripts/make_base_image.sh). Everything is installed in the venv /opt/venv (Debian's
# own Python refuses `pip install` outside one); a first stage installs, the second keeps the
# venv only, so the wheelhouse is no layer of the final image.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS install
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# wheelhouse/ (scripts/make_wheelhouse.sh) when the build context has one: the glob matches
# nothing otherwise, and pyproject.toml keeps the COPY valid.
COPY pyproject.toml wheelhouse* /wheelhouse/
# torch first: `pip install .` would otherwise resolve the multi-GB CUDA build from the index
# (pyproject pins torch==2.13.0, which 2.13.0+cpu satisfies). With a wheelhouse, every dependency
# too (through its fl-sim wheel, then uninstalled), so that an edit of the sources below does
# not install them again.
RUN if ls /wheelhouse/*.whl >/dev/null 2>&1; then \
        pip install --no-index --find-links /wheelhouse torch==2.13.0 \
        && if ls /wheelhouse/fl_sim-*.whl >/dev/null 2>&1; then \
            pip install --no-index --find-links /wheelhouse fl-sim && pip uninstall -y -q fl-sim; \
        fi; \
    else \
        pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu; \
    fi
WORKDIR /src
COPY pyproject.toml README.md ./
COPY fl_sim fl_sim
COPY clients clients
COPY strategies strategies
RUN if ls /wheelhouse/*.whl >/dev/null 2>&1; then \
        pip install --no-index --find-links /wheelhouse .; \
    else \
        pip install .; \
    fi \
    && python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"

FROM ${BASE_IMAGE}
COPY --from=install /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    # else the SuperLink would `uv sync` a venv per run (docs/design.md, Running Flower); the
    # image already holds every dependency
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_HOME=/home/flower/.flwr \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    FL_SIM_CACHE=/home/flower/cache

# Not root: certificates and node keys are mounted read-only, results and the SuperLink's state
# go to named volumes (created from these folders, so owned by flower).
RUN useradd --create-home --uid 1000 flower \
    && mkdir -p /app/results /home/flower/cache /home/flower/.flwr /home/flower/state \
    && chown -R flower:flower /app /home/flower
WORKDIR /app
USER flower

# The Fleet/Control/Runtime port of a SuperLink, and a SuperNode's Runtime (ClientApp) port.
EXPOSE 9093 9094
CMD ["flower-superlink", "--help"]
