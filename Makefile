# The two commands: `make demo` (set up + run all four DAGs on the embedded default) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

export AIRFLOW_HOME                    ?= $(CURDIR)/.airflow
export AIRFLOW__CORE__DAGS_FOLDER      := $(CURDIR)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER   := $(CURDIR)/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES    := False
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN ?= sqlite:///$(AIRFLOW_HOME)/airflow.db
export PYTHONPATH := $(CURDIR)/plugins$(if $(PYTHONPATH),:$(PYTHONPATH))
# airflow standalone starts its components as `airflow ...` subprocesses: the venv must be on PATH
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install demo test up bench lock clean

# The browser test (tests/test_ui_browser.py) drives Debian's chromium with Playwright: never a downloaded browser.
$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x /usr/bin/chromium || (export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q --no-install-recommends chromium fonts-liberation || \
	  (apt-get update -q && apt-get install -y -q --no-install-recommends chromium fonts-liberation))
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt -c constraints.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

# One slot per GPU; on a machine without one the GPU steps run on the CPU, so one per core (IMAGING_GPU_SLOTS wins).
GPU_SLOTS ?= $(or $(IMAGING_GPU_SLOTS),$(shell n=$$(nvidia-smi -L 2>/dev/null | grep -c GPU); [ "$$n" -gt 0 ] && echo $$n || nproc))

$(AIRFLOW_HOME)/airflow.db: $(STAMP)
	mkdir -p $(AIRFLOW_HOME)
	$(BIN)/airflow db migrate > $(AIRFLOW_HOME)/db-migrate.log 2>&1 || (cat $(AIRFLOW_HOME)/db-migrate.log; exit 1)
	$(BIN)/airflow pools set gpu $(GPU_SLOTS) "GPU slots (one task per GPU; per core where the GPU steps run on the CPU)" > /dev/null

demo: $(AIRFLOW_HOME)/airflow.db
	$(BIN)/python deploy/demo.py

# Two pytest workers, one test file each at a time (a file's module fixtures are built once): much of the suite waits on
# Airflow components and servers in subprocesses, so two workers suit two cores (41 min in one, 21 min in two on CI's
# 2-core machine). TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The UI on the embedded default. The landing folders hold synthetic studies, so the public demo key is selected
# explicitly (outputs marked DEMO KEY), as `make demo` does; set IMAGING_DEID_KEY for real data.
up: export IMAGING_DEID_DEMO := $(if $(IMAGING_DEID_KEY),0,1)
up: $(AIRFLOW_HOME)/airflow.db
	$(BIN)/python deploy/demo.py --prepare-ui
	$(BIN)/airflow standalone

bench: $(STAMP)
	$(BIN)/python bench/dag_parse_time.py

lock:
	rm -rf /tmp/imaging-lock && $(PYTHON) -m venv /tmp/imaging-lock
	/tmp/imaging-lock/bin/pip install -q -r requirements.txt
	(echo "# Lock file: every installed version, from 'pip freeze' of a venv built from requirements.txt (make lock)."; \
	 /tmp/imaging-lock/bin/pip freeze --exclude-editable | sed 's/^torch==2.13.0+cpu/torch==2.13.0/') > constraints.txt

clean:
	rm -rf data .airflow
