"""OpenLineage events of the imaging tasks: what each one reads and writes, through Airflow's OpenLineage provider.

Off unless the provider is configured (``[openlineage] transport``, ``AIRFLOW__OPENLINEAGE__TRANSPORT``; README
"Lineage"); then every task of the imaging DAGs sends START and COMPLETE (or FAIL) run events whose inputs and
outputs are the **zones** it reads and writes, never single objects:

| zone | location (per specialty) |
|---|---|
| ``landing`` | the specialty's landing prefix (raw inputs: object names there may carry patient names) |
| ``anonymized``, ``derived``, ``quarantine``, ``work``, ``runs``, ``ledger`` | ``<lake>/<zone>/<specialty>`` |
| ``warehouse`` | the warehouse tables the task writes |

Dataset names follow the OpenLineage naming spec, as the providers' own asset converters name them:

| location | namespace | name |
|---|---|---|
| ``file:///data/lake`` + ``derived/mammography`` | ``file`` | ``/data/lake/derived/mammography`` |
| ``s3://[conn@]bucket/lake`` + ... | ``s3://bucket`` | ``lake/derived/mammography`` |
| ``gs://[conn@]bucket/lake`` + ... | ``gs://bucket`` | ``lake/derived/mammography`` |
| ``duckdb:///data/warehouse.duckdb``, table ``studies`` | ``duckdb:///data/warehouse.duckdb`` | ``warehouse.main.studies`` (as dbt-duckdb) |
| ``bigquery://project/dataset``, table ``studies`` | ``bigquery`` | ``project.dataset.studies`` |

How: a task declares its zones where it is defined (``@task(reads=..., writes=...)`` of this module, a ``@task``
whose operator is :class:`LineagePythonOperator`; the landing sensor has them as class attributes), and the
operator answers the provider's ``get_openlineage_facets_on_start`` / ``_on_complete`` (its ``DefaultExtractor``)
with those zones resolved against the run's settings (Variables).  Not inlets/outlets: the lake and warehouse
URIs are run-time settings, unknown at parse time.  Not the hook-lineage collector either: ``ObjectStoragePath``
reports every object it opens there (on ``s3://``/``gs://``), raw landing objects included, whose names may carry
patient names; the provider reads the collector only for a task that reports no dataset itself, and the imaging
tasks drop what it gathered when they end (:func:`_forget_object_lineage`).

Nothing here may fail or slow a task: resolution errors are logged and the event goes out without datasets.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

from airflow.providers.standard.decorators.python import _PythonDecoratedOperator

log = logging.getLogger("imaging_dags.lineage")

LAKE_ZONES = ("anonymized", "derived", "quarantine", "work", "runs", "ledger")
STEP_ZONES = ("earlier_steps", "this_step")  # a processing step: the chain's work area before it / what it writes
ZONES = ("landing", *LAKE_ZONES, *STEP_ZONES, "warehouse")


# --------------------------------------------------------------------------------------------------- naming
def dataset_id(uri: str) -> tuple[str, str]:
    """``(namespace, name)`` of a storage location, as the providers' converters name it (file / s3 / gs); a
    connection id named in the URI (``s3://aws_default@bucket/x``) is not part of the dataset."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    bucket = parts.netloc.rpartition("@")[2]
    path = parts.path.rstrip("/")
    if scheme in ("", "file", "local"):
        return "file", (f"/{bucket}" if bucket else "") + (path or "/")
    if scheme in ("s3", "s3a"):
        return f"s3://{bucket}", path.lstrip("/") or "/"
    if scheme in ("gs", "gcs"):
        return f"gs://{bucket}", path.lstrip("/") or "/"
    return scheme, f"{bucket}{path}"


def table_ids(warehouse_uri: str, tables: Iterable[str]) -> list[tuple[str, str]]:
    """``(namespace, name)`` of warehouse tables: DuckDB as dbt-duckdb names it (``duckdb://<file>``,
    ``<file stem>.main.<table>``), BigQuery as the spec and Google's operators do (``bigquery``,
    ``project.dataset.table``)."""
    from pathlib import PurePath

    from imaging_tasks.warehouse import parse_warehouse_uri

    where = parse_warehouse_uri(warehouse_uri)
    if where.kind == "bigquery":
        return [("bigquery", f"{where.project}.{where.dataset}.{t}") for t in tables]
    path = str(PurePath(where.path))
    return [(f"duckdb://{path}", f"{PurePath(path).stem}.main.{t}") for t in tables]


def zone_uris(settings, zone: str, *, step: str | None = None) -> list[str]:
    """The location(s) of a lake zone for the specialty ``settings`` describe (``imaging_dags.settings``)."""
    root = settings.lake_uri.rstrip("/")
    if zone == "landing":
        return [settings.landing_uri]
    if zone in LAKE_ZONES:
        return [f"{root}/{zone}/{settings.specialty}"]
    if zone in STEP_ZONES:  # a chain's steps pass their outputs on in the work area; the last one publishes
        from imaging_tasks.specialties import get

        names = [s.name for s in get(settings.specialty).steps]
        index = names.index(step) if step in names else len(names) - 1
        if zone == "earlier_steps":
            return [f"{root}/work/{settings.specialty}"] if index > 0 else []
        last = index == len(names) - 1
        return [f"{root}/{'derived' if last else 'work'}/{settings.specialty}"]
    raise ValueError(f"unknown lineage zone {zone!r}; zones: {ZONES}")


def warehouse_tables(result=None) -> list[str]:
    """The tables a load wrote (from its returned row counts), else every table it may write."""
    from imaging_tasks.warehouse import TABLES

    if isinstance(result, dict):  # row counts per table: the tables that got rows
        written = [t for t, n in result.items() if t in TABLES and (not isinstance(n, int) or n > 0)]
        if written:
            return written
    return list(TABLES)


def datasets(settings, zones: Iterable[str], *, step: str | None = None, result=None) -> list[tuple[str, str]]:
    """``(namespace, name)`` of every dataset the ``zones`` name, in order, without repeats."""
    found: list[tuple[str, str]] = []
    for zone in zones:
        if zone == "warehouse":
            found += table_ids(settings.warehouse_uri, warehouse_tables(result))
        else:
            found += [dataset_id(u) for u in zone_uris(settings, zone, step=step)]
    return list(dict.fromkeys(found))


# --------------------------------------------------------------------------------------------------- operators
def _forget_object_lineage() -> None:
    """Drop what the hook-lineage collector gathered in this process (``ObjectStoragePath`` reports each object it
    opens, raw landing objects included): the provider would otherwise send those names for a task that
    reports no dataset of its own, and, under ``dag.test()``, for the next tasks of the same process."""
    try:
        from airflow.sdk.lineage import get_hook_lineage_collector

        get_hook_lineage_collector.cache_clear()
    except (ImportError, AttributeError):  # an Airflow without the cached collector: nothing to drop
        pass


class ImagingLineage:
    """Mixin for an operator of an imaging DAG: answers the OpenLineage provider with the zones it reads and
    writes (``lineage_reads`` / ``lineage_writes``, or the ones ``@task(reads=, writes=)`` put on its callable)."""

    lineage_reads: tuple[str, ...] = ()
    lineage_writes: tuple[str, ...] = ()

    def _lineage_zones(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        declared = getattr(getattr(self, "python_callable", None), "imaging_lineage", None)
        return declared if declared is not None else (self.lineage_reads, self.lineage_writes)

    def _lineage_args(self) -> dict:
        """The task's arguments by name (``specialty``, ``step``), positional ones included."""
        import inspect

        fn = getattr(self, "python_callable", None)
        args, kwargs = list(getattr(self, "op_args", None) or ()), dict(getattr(self, "op_kwargs", None) or {})
        if fn is None:
            return kwargs
        try:
            return dict(inspect.signature(fn).bind_partial(*args, **kwargs).arguments)
        except (TypeError, ValueError):
            return kwargs

    def _lineage_specialty(self) -> str | None:
        return self._lineage_args().get("specialty") or getattr(self, "specialty", None)

    def imaging_lineage(self, result=None):
        """The provider's ``OperatorLineage`` for this task (None when it cannot be resolved: logged)."""
        from airflow.providers.openlineage.extractors import OperatorLineage
        from openlineage.client.event_v2 import Dataset

        reads, writes = self._lineage_zones()
        specialty = self._lineage_specialty()
        if not (reads or writes) or not specialty:
            return OperatorLineage()
        settings = getattr(self, "_imaging_settings", None)
        if settings is None:  # not resolved in the task (see _do_render_template_fields): no Variable read here,
            return None       # the provider calls this in a forked process that must not talk to the API server
        try:
            step = self._lineage_args().get("step")
            inputs = datasets(settings, reads, step=step)
            outputs = datasets(settings, writes, step=step, result=result)
        except Exception as exc:  # noqa: BLE001 - lineage never fails a task
            log.warning("lineage of %s (%s): not resolved (%s); the event goes out without datasets",
                        getattr(self, "task_id", "?"), specialty, type(exc).__name__)
            return None
        return OperatorLineage(inputs=[Dataset(namespace=ns, name=n) for ns, n in inputs],
                               outputs=[Dataset(namespace=ns, name=n) for ns, n in outputs])

    def get_openlineage_facets_on_start(self):
        return self.imaging_lineage()

    def get_openlineage_facets_on_complete(self, task_instance):
        return self.imaging_lineage(getattr(self, "_imaging_result", None))

    def get_openlineage_facets_on_failure(self, task_instance):
        return self.imaging_lineage()

    def _do_render_template_fields(self, parent, template_fields, context, jinja_env, seen_oids) -> None:
        """After Airflow renders this task (in the task process, before the START event, for a mapped instance
        too): resolve the specialty's settings once, while Variables can be read."""
        super()._do_render_template_fields(parent, template_fields, context, jinja_env, seen_oids)
        if parent is self and getattr(self, "_imaging_settings", None) is None and _lineage_on():
            try:
                from imaging_dags.settings import for_specialty

                specialty = self._lineage_specialty()
                self._imaging_settings = for_specialty(specialty) if specialty else None
            except Exception as exc:  # noqa: BLE001 - the task body reports a configuration error itself
                log.warning("lineage of %s: settings not resolved (%s)", getattr(self, "task_id", "?"),
                            type(exc).__name__)

    def execute(self, context):
        try:
            self._imaging_result = super().execute(context)
            return self._imaging_result
        finally:
            _forget_object_lineage()


def _lineage_on() -> bool:
    try:
        from airflow.providers.openlineage import conf
    except ImportError:
        return False
    try:
        return not conf.is_disabled()
    except Exception:  # noqa: BLE001
        return False


class LineagePythonOperator(ImagingLineage, _PythonDecoratedOperator):
    """The operator of the imaging ``@task`` functions: Airflow's TaskFlow operator, with lineage."""


def task(python_callable: Callable | None = None, *, reads: Iterable[str] = (), writes: Iterable[str] = (),
         **kwargs):
    """``@task(reads=("landing",), writes=("work", "quarantine"), ...)``: Airflow's ``@task`` (same arguments,
    ``.override``, ``.partial().expand()``) whose events name the zones it reads and writes (see the module doc)."""
    from airflow.sdk.bases.decorator import task_decorator_factory

    reads, writes = tuple(reads), tuple(writes)
    unknown = sorted(set(reads + writes) - set(ZONES))
    if unknown:
        raise ValueError(f"unknown lineage zone(s) {unknown}; zones: {ZONES}")

    def decorate(fn):
        fn.imaging_lineage = (reads, writes)
        return task_decorator_factory(python_callable=fn, decorated_operator_class=LineagePythonOperator, **kwargs)

    return decorate(python_callable) if python_callable is not None else decorate
