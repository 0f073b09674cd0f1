# Image for the production-like stack (docker-compose.yaml): Airflow 3.3 with this project's pinned dependencies.
FROM apache/airflow:3.3.2-python3.11
COPY --chown=airflow:root requirements.txt constraints.txt pyproject.toml /opt/imaging/
COPY --chown=airflow:root imaging_tasks /opt/imaging/imaging_tasks
RUN pip install --no-cache-dir -r /opt/imaging/requirements.txt -c /opt/imaging/constraints.txt \
 && pip install --no-cache-dir --no-deps /opt/imaging
