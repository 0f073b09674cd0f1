#!/usr/bin/env bash
# One-off initialisation of the production stack: docker-compose.yaml's `airflow-init` service runs it as root
# (like the official Airflow compose file's init), every other component waits for it to complete.
#
# 1. warns when Docker has too little memory/CPU/disk for Airflow + torch;
# 2. writes the shared airflow.cfg ($AIRFLOW_CONFIG on the airflow-config volume) if missing: Airflow generates
#    the fernet key and the JWT secret into it, and every component reads the same file, so tokens the scheduler
#    signs validate in the api-server;
# 3. writes the SimpleAuthManager login ($_AIRFLOW_WWW_USER_USERNAME / _PASSWORD) into its passwords file;
# 4. migrates the metadata DB (PostgreSQL) and creates the `gpu` pool (IMAGING_GPU_SLOTS slots, one per GPU);
# 5. hands logs, config and /data to AIRFLOW_UID.
set -euo pipefail

AIRFLOW_UID="${AIRFLOW_UID:-50000}"   # on Linux, AIRFLOW_UID=$(id -u) in .env keeps ./logs etc. yours

one_meg=1048576
mem_available=$(($(getconf _PHYS_PAGES) * $(getconf PAGE_SIZE) / one_meg))
cpus_available=$(grep -cE 'cpu[0-9]+' /proc/stat)
disk_available=$(df / | tail -1 | awk '{print $4}')
if (( mem_available < 8000 )); then
  echo "WARNING: ${mem_available} MB of memory for Docker; at least 8 GB recommended (Airflow + torch workers)"
fi
if (( cpus_available < 2 )); then
  echo "WARNING: ${cpus_available} CPU(s) for Docker; at least 2 recommended"
fi
if (( disk_available < one_meg * 20 )); then
  echo "WARNING: $((disk_available / one_meg)) GB of free disk; at least 20 GB recommended (CUDA image)"
fi

mkdir -p /opt/airflow/logs /opt/airflow/config /data

echo "Airflow $(airflow version) -- config: ${AIRFLOW_CONFIG:-\$AIRFLOW_HOME/airflow.cfg}"
airflow config list > /dev/null   # creates the config file with generated secrets when it does not exist yet

passwords="${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE:-/opt/airflow/config/simple_auth_manager_passwords.json}"
python - "${passwords}" <<'EOF'
import json, os, sys
user = os.environ.get("_AIRFLOW_WWW_USER_USERNAME") or "airflow"
password = os.environ.get("_AIRFLOW_WWW_USER_PASSWORD") or "airflow"
with open(sys.argv[1], "w") as f:
    json.dump({user: password}, f)
os.chmod(sys.argv[1], 0o600)
print(f"login: user {user!r} (password from _AIRFLOW_WWW_USER_PASSWORD)")
EOF

# /entrypoint waits until the metadata DB accepts connections, then runs the command
/entrypoint airflow db migrate
/entrypoint airflow pools set gpu "${IMAGING_GPU_SLOTS:-1}" "GPU slots (one task per GPU)"

chown -R "${AIRFLOW_UID}:0" /opt/airflow/logs /opt/airflow/config /data
echo "airflow-init done"
