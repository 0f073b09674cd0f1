"""docker-compose.yaml holds together without a Docker engine (none on CI machines).

Checks what `docker compose config` / `up` would trip over: the Compose Specification schema, services named in
depends_on, named volumes, every ${VAR} (a default or documented in .env.example), every bind-mounted or
referenced file (Dockerfile, its COPY sources, init scripts), and the shape the README promises: the official
Airflow 3 services, CeleryExecutor on Redis/PostgreSQL, GPU work on a `gpu` worker with an NVIDIA reservation,
MinIO buckets for landing and lake.

Schema: compose-spec/compose-spec schema/compose-spec.json (Apache-2.0), snapshot 2026-06-23, copied from
shared/reference.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft7Validator

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yaml"
CPU_OVERRIDE = REPO / "deploy" / "docker-compose.cpu.yaml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "Dockerfile"
AIRFLOW_SERVICES = {"airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
                    "airflow-worker", "airflow-init"}


class _ComposeLoader(yaml.SafeLoader):
    """Compose's YAML: also the `!reset` / `!override` merge tags of override files."""


for _tag in ("!reset", "!override"):
    _ComposeLoader.add_constructor(_tag, lambda loader, node: (
        loader.construct_mapping(node) if isinstance(node, yaml.MappingNode)
        else loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode)
        else loader.construct_scalar(node)))


def _load(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=_ComposeLoader)


@pytest.fixture(scope="module")
def compose() -> dict:
    return _load(COMPOSE)


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, $VAR; `$$` is a literal dollar
_VAR = re.compile(r"(?<!\$)\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?+])?(?P<arg>[^}]*)\}"
                  r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


def _variables(text: str) -> dict[str, bool]:
    """Variable -> has a default, over the compose file's text with `$$` escapes removed."""
    out: dict[str, bool] = {}
    for m in _VAR.finditer(text.replace("$$", "")):
        name = m.group("braced") or m.group("bare")
        out[name] = out.get(name, False) or (m.group("op") or "").lstrip(":") == "-"
    return out


def _interpolate(value: str) -> str:
    """The value with every variable at its default (what an empty .env gives)."""
    def sub(m):
        return m.group("arg") if (m.group("op") or "").lstrip(":") == "-" else ""
    return _VAR.sub(sub, value.replace("$$", "\0")).replace("\0", "$")


def _volume_source(vol) -> str:
    return _interpolate(vol["source"]) if isinstance(vol, dict) else _interpolate(vol).split(":")[0]


def _env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            out[key.strip()] = re.sub(r"\s+#.*$", "", value).strip().strip('"')
    return out


def test_compose_files_match_the_spec():
    schema = json.loads((REPO / "tests" / "data" / "compose-spec.json").read_text())
    for path in (COMPOSE, CPU_OVERRIDE):
        errors = sorted(Draft7Validator(schema).iter_errors(_load(path)), key=str)
        assert not errors, (path.name, [e.message for e in errors])


def test_the_official_airflow_3_services_and_the_imaging_extras(services):
    assert AIRFLOW_SERVICES | {"postgres", "redis", "airflow-worker-gpu", "minio", "minio-init"} <= set(services)
    for name in AIRFLOW_SERVICES | {"airflow-worker-gpu"}:
        svc = services[name]
        assert svc["image"] == "${IMAGING_IMAGE_NAME:-imaging-dags:3.3.2}" and svc["build"]["context"] == ".", name
        env = svc["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://"), name
        assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://"), name
        assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql://"), name
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/", name
        # one airflow.cfg (generated fernet key and JWT secret) for every component
        assert env["AIRFLOW_CONFIG"] == "/opt/airflow/config/airflow.cfg", name
        assert "airflow-config:/opt/airflow/config" in svc["volumes"], name
    for name in AIRFLOW_SERVICES - {"airflow-init"}:
        assert services[name]["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"
    for name in ("postgres", "redis", "minio", "airflow-apiserver", "airflow-scheduler", "airflow-worker",
                 "airflow-worker-gpu"):
        assert services[name].get("healthcheck"), name
    assert services["airflow-apiserver"]["command"] == "api-server"
    assert services["airflow-dag-processor"]["command"] == "dag-processor"


def test_gpu_work_goes_to_the_gpu_worker_and_pool(services):
    from imaging_dags.settings import GPU_POOL, GPU_QUEUE

    cpu, gpu = services["airflow-worker"], services["airflow-worker-gpu"]
    assert cpu["command"].split()[:4] == ["celery", "worker", "--queues", "default"]
    assert gpu["command"].split()[:4] == ["celery", "worker", "--queues", "gpu"]
    assert "--concurrency ${IMAGING_GPU_SLOTS:-1}" in gpu["command"]  # one task per reserved GPU
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "${IMAGING_GPU_SLOTS:-1}", "capabilities": ["gpu"]}]
    for svc in (cpu, gpu):
        assert svc["environment"]["AIRFLOW__IMAGING__GPU_QUEUE"] == GPU_QUEUE == "gpu"
        assert svc["environment"]["AIRFLOW__IMAGING__GPU_POOL"] == GPU_POOL == "gpu"
    assert gpu["environment"]["IMAGING_DEVICE"] == "${IMAGING_GPU_DEVICE:-auto}"
    assert cpu["environment"]["IMAGING_DEVICE"] == "cpu"
    # airflow-init creates the pool with as many slots as GPUs reserved
    init = (REPO / "deploy" / "airflow-init.sh").read_text()
    assert 'pools set gpu "${IMAGING_GPU_SLOTS:-1}"' in init
    assert services["airflow-init"]["environment"]["IMAGING_GPU_SLOTS"] == "${IMAGING_GPU_SLOTS:-1}"
    # without a GPU: the override drops the reservation, the same worker serves `gpu` on CPU
    override = _load(CPU_OVERRIDE)["services"]
    assert set(override) == {"airflow-worker-gpu"} and override["airflow-worker-gpu"]["deploy"] == {}
    assert "!reset" in CPU_OVERRIDE.read_text()


def test_minio_is_the_s3_landing_and_lake(services):
    env = services["airflow-worker"]["environment"]
    conn = json.loads(_interpolate(env["AIRFLOW_CONN_IMAGING_S3"]))
    assert conn["conn_type"] == "aws" and conn["extra"]["endpoint_url"] == "http://minio:9000"
    assert conn["extra"]["config_kwargs"]["s3"]["addressing_style"] == "path"
    landing, lake = (_interpolate(env[f"AIRFLOW_VAR_IMAGING_{k}_URI"]) for k in ("LANDING", "LAKE"))
    assert (landing, lake) == ("s3://imaging_s3@imaging-landing", "s3://imaging_s3@imaging-lake")
    # the buckets the connection points at are the ones minio-init creates, for the account it creates
    init = services["minio-init"]
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    assert services["airflow-init"]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    init_env = {k: _interpolate(v) for k, v in init["environment"].items()}
    assert (init_env["IMAGING_LANDING_BUCKET"], init_env["IMAGING_LAKE_BUCKET"]) == ("imaging-landing", "imaging-lake")
    assert (init_env["IMAGING_S3_ACCESS_KEY"], init_env["IMAGING_S3_SECRET_KEY"]) == (conn["login"], conn["password"])
    script = (REPO / "deploy" / "minio-init.sh").read_text()
    assert 'mc mb --ignore-existing "local/${LANDING}" "local/${LAKE}"' in script
    # least privilege: landing is read-only for Airflow, writes only on the lake
    policy = json.loads(_policy_json(script, LANDING="imaging-landing", LAKE="imaging-lake"))
    writes = {"s3:PutObject", "s3:DeleteObject"}
    for stmt in policy["Statement"]:
        if writes & set(stmt["Action"]):
            assert stmt["Resource"] == ["arn:aws:s3:::imaging-lake/*"], stmt
    assert any(stmt["Resource"] == ["arn:aws:s3:::imaging-landing/*"] and stmt["Action"] == ["s3:GetObject"]
               for stmt in policy["Statement"])
    # de-identification key from the environment; no key and no explicit demo opt-in: the DAGs refuse
    deid = json.loads(_interpolate(env["AIRFLOW_CONN_IMAGING_DEID"]))
    assert deid == {"conn_type": "generic", "password": ""}
    assert _interpolate(env["IMAGING_DEID_DEMO"]) == "0"


def _policy_json(script: str, **values: str) -> str:
    body = script.split("<<EOF\n", 1)[1].split("\nEOF\n", 1)[0]
    return re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], body)


def test_services_volumes_and_variables_resolve(compose, services):
    names = set(services)
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        for dep in deps:
            assert dep in names, f"{name} depends on unknown service {dep}"
            assert not services[dep].get("profiles") or svc.get("profiles"), f"{name} needs profile-only {dep}"
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            source = _volume_source(vol)
            if source.startswith((".", "/", "~")):
                continue
            assert source in declared, f"{name}: named volume {source} is not declared"
            used.add(source)
    assert used == declared, f"declared but unused volumes: {declared - used}"

    variables = _variables(COMPOSE.read_text())
    documented = _env_example()
    undocumented = sorted(v for v, has_default in variables.items() if not has_default and v not in documented)
    assert not undocumented, f"no default and not in .env.example: {undocumented}"
    stale = sorted(set(documented) - set(variables) - {"COMPOSE_FILE", "COMPOSE_PROFILES"})
    assert not stale, f".env.example documents variables the compose file does not use: {stale}"
    # the documented values are the compose defaults (an untouched .env changes nothing)
    defaults = {m.group("braced"): m.group("arg") for m in _VAR.finditer(COMPOSE.read_text().replace("$$", ""))
                if m.group("braced") and (m.group("op") or "").lstrip(":") == "-"}
    differs = {k: (v, documented[k]) for k, v in defaults.items() if k in documented and documented[k] != v}
    assert not differs, differs


def test_referenced_files_exist(services):
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            source = _volume_source(vol)
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name} bind-mounts missing {source}"
        build = svc.get("build")
        if build:
            context = REPO / build["context"]
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
    # the init scripts the services run
    assert services["airflow-init"]["command"] == ["/opt/imaging/deploy/airflow-init.sh"]
    assert "COPY --chown=airflow:0 deploy/airflow-init.sh /opt/imaging/deploy/airflow-init.sh" in DOCKERFILE.read_text()
    assert services["minio-init"]["entrypoint"] == ["/bin/sh", "/deploy/minio-init.sh"]
    assert "./deploy/minio-init.sh:/deploy/minio-init.sh:ro" in services["minio-init"]["volumes"]
    # every COPY source of the Dockerfile is in the build context (and not excluded by .dockerignore)
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY "):
            sources = [a for a in line.split()[1:-1] if not a.startswith("--")]
            for src in sources:
                assert (REPO / src).exists(), f"Dockerfile copies missing {src}"
                assert src.split("/")[0] not in ignored, f"{src} is excluded by .dockerignore"
    assert {".venv", "data", ".git"} <= ignored


def test_init_scripts_parse():
    for shell, script in (("bash", "airflow-init.sh"), ("sh", "minio-init.sh")):
        exe = shutil.which(shell)
        if exe:
            res = subprocess.run([exe, "-n", str(REPO / "deploy" / script)], capture_output=True, text=True)
            assert res.returncode == 0, (script, res.stderr)
    compile((REPO / "deploy" / "demo_data.py").read_text(), "demo_data.py", "exec")


def test_image_installs_the_lock_file_and_cuda_torch():
    text = DOCKERFILE.read_text()
    requirements = (REPO / "requirements.txt").read_text()
    constraints = dict(line.split("==", 1) for line in (REPO / "constraints.txt").read_text().splitlines()
                       if "==" in line and not line.startswith("#"))
    airflow = re.search(r"^apache-airflow(?:\[[^\]]*\])?==(\S+)", requirements, re.M).group(1)
    assert f"ARG AIRFLOW_VERSION={airflow}" in text
    assert "FROM apache/airflow:slim-${AIRFLOW_VERSION}-python${PYTHON_VERSION}" in text
    assert f"ARG TORCH_VERSION={constraints['torch']}" in text
    assert "ARG TORCH_INDEX_URL=" in text and '--index-url "${TORCH_INDEX_URL}"' in text
    assert text.count("-c /opt/imaging/constraints.txt") == 2  # torch and everything else under the lock
    assert "pip install --no-cache-dir -r /opt/imaging/requirements.txt" in text
    # the production extras (CeleryExecutor, PostgreSQL) come with requirements.txt and are locked
    assert re.search(r"^apache-airflow\[[^\]]*celery[^\]]*postgres[^\]]*\]==", requirements, re.M)
    assert {"celery", "apache-airflow-providers-celery", "apache-airflow-providers-postgres", "redis"} <= {
        n.lower() for n in constraints}


def test_helm_values_put_gpu_work_on_the_gpu_node_pool():
    values = yaml.safe_load((REPO / "deploy" / "helm" / "values.yaml").read_text())
    assert values["executor"] == "CeleryExecutor"
    assert values["config"]["imaging"] == {"gpu_queue": "gpu", "gpu_pool": "gpu", "schedule": "0 2 * * *",
                                           "sensor_timeout": "3600", "events_receiver": "true"}
    celery = values["workers"]["celery"]
    assert celery["queue"] == "default" and celery["enableDefault"] is True
    (gpu,) = celery["sets"]
    assert gpu["queue"] == "gpu" and gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["tolerations"][0]["key"] == "nvidia.com/gpu" and gpu["nodeSelector"]
    assert "nvidia.com/gpu" not in json.dumps(celery["resources"])  # CPU workers stay off the GPU nodes


def test_the_dicom_receiver_is_deployed_beside_airflow(services):
    """docker compose: port 11112, a spool volume, the landing bucket with an account of its own, the api-server
    for its asset events, which the DAGs are scheduled on; Kubernetes: the same in deploy/helm/dicom-receiver.yaml."""
    receiver = services["dicom-receiver"]
    assert receiver["ports"] == ["${IMAGING_RECEIVER_PORT:-11112}:11112"]
    assert receiver["volumes"] == ["dicom-spool:/spool"]
    command = " ".join(receiver["entrypoint"])
    assert "imaging-tasks receive" in command and "--spool /spool" in command and "airflow-apiserver:8080" in command
    assert receiver["environment"]["AWS_ACCESS_KEY_ID"].startswith("${IMAGING_RECEIVER_S3_ACCESS_KEY")
    assert services["airflow-scheduler"]["environment"]["AIRFLOW__IMAGING__EVENTS_RECEIVER"] == "true"
    docs = list(yaml.safe_load_all((REPO / "deploy" / "helm" / "dicom-receiver.yaml").read_text()))
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["imaging-tasks", "receive"] and "--deidentify" in container["args"]
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/spool"}
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
