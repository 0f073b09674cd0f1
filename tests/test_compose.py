"""docker-compose.yaml is valid against the Compose Specification (no Docker engine on CI machines).

Schema: compose-spec/compose-spec schema/compose-spec.json (Apache-2.0), snapshot 2026-06-23, copied from
shared/reference.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml
from jsonschema import Draft7Validator

REPO = Path(__file__).resolve().parents[1]


def test_compose_file_matches_the_spec_and_routes_gpu_work():
    compose = yaml.safe_load((REPO / "docker-compose.yaml").read_text())
    schema = json.loads((REPO / "tests" / "data" / "compose-spec.json").read_text())
    errors = sorted(Draft7Validator(schema).iter_errors(compose), key=str)
    assert not errors, [e.message for e in errors]
    services = compose["services"]
    assert {"postgres", "redis", "scheduler", "api-server", "dag-processor", "triggerer", "worker",
            "worker-gpu"} <= set(services)
    assert "gpu" in services["worker-gpu"]["command"]
    assert services["scheduler"]["environment"]["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
