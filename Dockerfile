# syntax=docker/dockerfile:1
# The image of the production stack (docker-compose.yaml) and of the official Helm chart (README, "Running in
# production"): Airflow 3.3.2 slim (core only) + requirements.txt under this project's lock file (constraints.txt;
# includes the CeleryExecutor and PostgreSQL extras) + imaging_tasks, the DAGs and the plugins baked in (docker-compose.yaml mounts the working copy over them for development).
#
# torch comes from TORCH_INDEX_URL, at the locked version:
#   https://pypi.org/simple                  (default) PyPI's Linux x86_64 wheel: the CUDA build, NVIDIA runtime as wheels
#   https://download.pytorch.org/whl/cu128   a given CUDA (cu126, cu128, cu130, ... whichever the driver supports)
#   https://download.pytorch.org/whl/cpu     a CPU-only image, about 4 GB smaller (tasks fall back to CPU)
# e.g. docker compose build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128, or TORCH_INDEX_URL in .env
ARG AIRFLOW_VERSION=3.3.2
ARG PYTHON_VERSION=3.11
FROM apache/airflow:slim-${AIRFLOW_VERSION}-python${PYTHON_VERSION}

ARG TORCH_INDEX_URL=https://pypi.org/simple
ARG TORCH_VERSION=2.13.0

# /data: the named volume of the embedded warehouse (DuckDB) and scratch space; a new named volume takes this
# directory's owner, so the airflow user can write to it.
USER root
RUN mkdir -p /data && chown airflow:0 /data && chmod 2775 /data
USER airflow

COPY --chown=airflow:0 requirements.txt constraints.txt pyproject.toml /opt/imaging/
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" --extra-index-url https://pypi.org/simple \
        "torch==${TORCH_VERSION}" -c /opt/imaging/constraints.txt \
 && pip install --no-cache-dir -r /opt/imaging/requirements.txt \
        -c /opt/imaging/constraints.txt

COPY --chown=airflow:0 imaging_tasks /opt/imaging/imaging_tasks
RUN pip install --no-cache-dir --no-deps /opt/imaging

COPY --chown=airflow:0 dags /opt/airflow/dags
COPY --chown=airflow:0 plugins /opt/airflow/plugins
COPY --chown=airflow:0 deploy/airflow-init.sh /opt/imaging/deploy/airflow-init.sh

# plugins/ holds the imaging_dags package the DAG files import; IMAGING_DATA_DIR is the embedded defaults' root
ENV PYTHONPATH=/opt/airflow/plugins \
    IMAGING_DATA_DIR=/data
