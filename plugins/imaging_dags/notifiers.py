"""Who gets told what: a failed task (after its retries) and the end of every run, by email and/or webhook.

- **Task failure** (``on_failure_callback`` of every task, via ``imaging_dag``): the DAG, run, task, the
  pseudonymous study the mapped instance held, the step and the reason (exception classes and the ledger's reason
  code), with links to the study's QC page, the task instance and the run's QC page.  A retry is not a failure:
  Airflow calls this only when the last attempt failed.
- **End of run** (``on_success_callback`` and ``on_failure_callback`` of the DAG): counts of the run's studies
  loaded, quarantined (by reason) and failed (each with its step and reason) from the warehouse's ``ledger`` table,
  with links to the run's QC and Airflow pages.

Channels, read at run time (Variables, so ``AIRFLOW_VAR_IMAGING_NOTIFY_EMAIL_TO`` etc.; see
:func:`imaging_dags.settings.notify_channels`): email through the SMTP provider (``SmtpNotifier`` on the
connection ``imaging_notify_smtp_conn_id``), and a Slack-compatible incoming webhook through the Slack provider
(``SlackWebhookNotifier`` on the ``slackwebhook`` connection ``imaging_notify_webhook_conn_id``).  Nothing
configured: nothing is sent and nothing fails.  A configured connection that does not exist fails the callback
with what to set (the other channel is still served).

PHI-free by construction: the message is made by :func:`compose` from typed facts holding Airflow ids,
pseudonyms (checked against the pseudonym pattern), step names, reason codes and exception *class names*, never an
exception's message, a header value or a raw path; links are built from the same ids.  :func:`compose` is pure
(no Airflow) and is what the tests exercise.
"""
from __future__ import annotations

import html
import logging
import re
from dataclasses import dataclass, field
from urllib.parse import quote

from airflow.sdk import BaseNotifier

log = logging.getLogger("imaging_dags")

URL_PREFIX = "/imaging"  # the QC app's mount point (imaging_dags.qc.URL_PREFIX; kept here so compose() is pure)
_STUDY = re.compile(r"^S[A-Za-z0-9]{4,64}$")        # study pseudonyms (S + base32), as the QC app accepts them
_AIRFLOW_ID = re.compile(r"^[A-Za-z0-9_.~:+-]{1,250}$")  # dag, run and task ids (Airflow's allowed characters)
_CODE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,79}$")  # reason codes and exception class names
_STEP = re.compile(r"^[A-Za-z][A-Za-z0-9_ -]{0,63}$")  # step names ("process_study", "de-identification")
FAILED_LISTED = 20  # failed studies named one by one in a summary


# --------------------------------------------------------------------------------------------- facts (plain data)
@dataclass(frozen=True)
class TaskFailure:
    """What is known about one task instance that failed after its retries."""

    dag_id: str
    run_id: str
    task_id: str
    map_index: int = -1
    study: str | None = None             # pseudonym of the study the instance held
    step: str | None = None              # the ledger's step (else the task id)
    reason: str | None = None            # the ledger's reason code (e.g. RuntimeError, phi_audit_failed)
    exceptions: tuple[str, ...] = ()     # class names, outermost first (StudyFailed <- RuntimeError)
    attempt: int | None = None
    max_attempts: int | None = None


@dataclass(frozen=True)
class RunSummary:
    """The end of one run: its outcome and what the ledger says happened to its studies."""

    dag_id: str
    run_id: str
    succeeded: bool
    reason: str | None = None                                      # Airflow's (success, task_failure, ...)
    loaded: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)      # reason code -> studies
    failed: tuple[tuple[str, str, str], ...] = ()                  # (study, step, reason), up to FAILED_LISTED
    failed_count: int = 0
    ledger_note: str | None = None                                 # why the counts are missing, as a class name


@dataclass(frozen=True)
class Message:
    subject: str
    text: str
    links: tuple[tuple[str, str], ...] = ()

    @property
    def html(self) -> str:
        """The email body: the text, escaped, with the links clickable."""
        anchors = {f"  {title}: {url}": f'  {html.escape(title)}: <a href="{html.escape(url)}">{html.escape(url)}</a>'
                   for title, url in self.links}
        lines = [anchors.get(line) or html.escape(line) for line in self.text.splitlines()]
        return "<pre style=\"font-family: monospace\">" + "\n".join(lines) + "</pre>"


# ------------------------------------------------------------------------------------------- the one pure function
def _id(value, fallback: str = "?") -> str:
    text = str(value) if value is not None else ""
    return text if _AIRFLOW_ID.match(text) else fallback


def _code(value, fallback: str = "unknown") -> str:
    text = str(value) if value is not None else ""
    return text if _CODE.match(text) else fallback


def _step(value, fallback: str = "?") -> str:
    text = str(value) if value is not None else ""
    return text if _STEP.match(text) else fallback


def pseudonym(value) -> str | None:
    """``value`` if it is a study pseudonym, else ``None`` (a label that is not one is never shown)."""
    text = str(value).split(" ", 1)[0] if value else ""
    return text if _STUDY.match(text) else None


def _seg(text: str) -> str:
    return quote(str(text), safe="")


def links_for(facts: TaskFailure | RunSummary, base_url: str) -> tuple[tuple[str, str], ...]:
    """The UI pages to open: the QC app's (``/imaging/...``) and Airflow's own, under ``[api] base_url``."""
    base = (base_url or "http://localhost:8080").rstrip("/")
    dag, run = _seg(_id(facts.dag_id)), _seg(_id(facts.run_id))
    run_qc = ("Run QC", f"{base}{URL_PREFIX}/dags/{dag}/runs/{run}")
    run_page = ("Airflow run", f"{base}/dags/{dag}/runs/{run}")
    if isinstance(facts, RunSummary):
        return run_qc, run_page
    task = _seg(_id(facts.task_id))
    mapped = facts.map_index is not None and facts.map_index >= 0
    ti_page = ("Task instance (log)", f"{base}/dags/{dag}/runs/{run}/tasks/{task}"
               + (f"/mapped/{int(facts.map_index)}" if mapped else ""))
    out = [ti_page, run_qc, run_page]
    if mapped and pseudonym(facts.study):
        out.insert(0, ("Study QC", f"{base}{URL_PREFIX}/dags/{dag}/runs/{run}/tasks/{task}/{int(facts.map_index)}"))
    return tuple(out)


def compose(facts: TaskFailure | RunSummary, *, base_url: str) -> Message:
    """The message for ``facts``: subject, plain text (email and webhook alike) and links.

    Pure: no Airflow, no I/O.  Every value shown passes a pattern (Airflow ids, study pseudonyms, step names,
    reason codes / class names) or is a number, so free text (an exception's message, a header) cannot get in.
    """
    links = links_for(facts, base_url)
    dag, run = _id(facts.dag_id), _id(facts.run_id)
    if isinstance(facts, TaskFailure):
        study = pseudonym(facts.study)
        step = _step(facts.step or facts.task_id)
        exceptions = [_code(e) for e in facts.exceptions]
        reason = _code(facts.reason) if facts.reason else (exceptions[-1] if exceptions else "unknown")
        what = f"study {study}" if study else f"task {_id(facts.task_id)}"
        subject = f"[imaging] {dag}: {what} failed at {step} ({reason})"
        attempt = (f"{facts.attempt} of {facts.max_attempts}" if facts.attempt and facts.max_attempts
                   else str(facts.attempt or "?"))
        lines = ["An imaging task failed after its retries.", "",
                 f"DAG:      {dag}",
                 f"Run:      {run}",
                 f"Task:     {_id(facts.task_id)}" + (f" [map index {int(facts.map_index)}]"
                                                        if facts.map_index is not None and facts.map_index >= 0
                                                        else ""),
                 f"Study:    {study or '-'}" + (" (pseudonym)" if study else ""),
                 f"Step:     {step}",
                 f"Reason:   {reason}" + (f" (raised as {' <- '.join(exceptions)})" if exceptions else ""),
                 f"Attempt:  {attempt}"]
        if study:
            lines += ["", "The ledger records this study as failed; the next run takes it again."]
    else:
        outcome = "succeeded" if facts.succeeded else "failed"
        quarantined = sum(facts.quarantined.values())
        failed = max(facts.failed_count, len(facts.failed))
        subject = (f"[imaging] {dag} run {outcome}: {facts.loaded} loaded, {quarantined} quarantined, "
                   f"{failed} failed")
        lines = [f"An imaging run {outcome}.", "",
                 f"DAG:          {dag}",
                 f"Run:          {run}",
                 f"Outcome:      {outcome}" + (f" ({_code(facts.reason)})" if facts.reason else "")]
        if facts.ledger_note:
            lines.append(f"Studies:      unknown: the ledger could not be read ({_code(facts.ledger_note)})")
        else:
            by_reason = ", ".join(f"{_code(r)}: {n}" for r, n in sorted(facts.quarantined.items()))
            lines += [f"Loaded:       {int(facts.loaded)}",
                      f"Quarantined:  {quarantined}" + (f" ({by_reason})" if by_reason else ""),
                      f"Failed:       {failed}"]
            for study, step, reason in facts.failed[:FAILED_LISTED]:
                lines.append(f"  - {pseudonym(study) or '(unnamed study)'} at {_step(step)}: {_code(reason)}")
            if failed > FAILED_LISTED:
                lines.append(f"  ... and {failed - FAILED_LISTED} more (the ledger table lists them all)")
    lines += ["", "Links:"] + [f"  {title}: {url}" for title, url in links]
    lines += ["", "Pseudonymous identifiers only; details are in the task logs and the ledger."]
    return Message(subject=subject, text="\n".join(lines), links=links)


# ------------------------------------------------------------------------------- facts from an Airflow context
def _exception_chain(exc: BaseException | None) -> tuple[str, ...]:
    names, seen = [], set()
    while exc is not None and id(exc) not in seen and len(names) < 5:
        seen.add(id(exc))
        names.append(type(exc).__name__)
        exc = exc.__cause__
    return tuple(names)


def _study_record(specialty: str, study: str, run_id: str) -> dict:
    """The study's ledger record if this run marked it failed (step, reason, attempt); else or when unreadable
    ``{}``."""
    from imaging_dags.settings import for_specialty, object_storage

    try:
        with object_storage():
            record = for_specialty(specialty).lake.ledger.get(study) or {}
    except Exception as exc:  # the notification matters more than its detail
        log.warning("notification: could not read the ledger record of %s study %s (%s)", specialty, study,
                    type(exc).__name__)
        return {}
    return record if record.get("run_id") == run_id and record.get("state") == "failed" else {}


def task_failure_facts(context, *, study: str | None = None, step: str | None = None,
                       exc: BaseException | None = None) -> TaskFailure:
    """The failed instance's facts; or, given ``study``, ``step`` and ``exc``, those of one study of a batch that
    failed on the instance's last attempt (the instance goes on for the others)."""
    ti = context["ti"]
    map_index = getattr(ti, "map_index", -1)
    study = pseudonym(study if study is not None else
                      context.get("study_label") or getattr(ti, "rendered_map_index", None))
    record = _study_record(ti.dag_id, study, ti.run_id) if study else {}
    task = getattr(ti, "task", None)
    retries = getattr(task, "retries", None)
    return TaskFailure(dag_id=ti.dag_id, run_id=ti.run_id, task_id=ti.task_id,
                       map_index=map_index if map_index is not None else -1, study=study,
                       step=record.get("step") or step or ti.task_id, reason=record.get("reason"),
                       exceptions=_exception_chain(exc if exc is not None else context.get("exception")),
                       attempt=getattr(ti, "try_number", None),
                       max_attempts=(retries + 1) if isinstance(retries, int) else None)


def notify_study_failure(context, *, study: str, step: str, exc: BaseException) -> None:
    """Tell that one study failed after its retries, as a failed task is told; never fails the task (its other
    studies' work is done): a channel that cannot be served is logged."""
    from imaging_dags.settings import notify_channels

    try:
        channels = notify_channels()
        if channels:
            message = compose(task_failure_facts(context, study=study, step=step, exc=exc), base_url=ui_base_url())
            sent = deliver(message, channels, context)
            log.info("notification sent (%d channel(s)): %s", sent, message.subject)
    except Exception as err:  # noqa: BLE001 - the notification matters less than the batch
        log.error("notification of study %s failing at %s not sent: %s", pseudonym(study) or "?", step,
                  err if isinstance(err, NotificationError) else type(err).__name__)


def told_by_the_summary(context) -> bool:
    """The load step failing on purpose, after loading the rest, because a study or another task of the run
    failed: those were told already and the end-of-run summary names the failed studies, so no message of its
    own.  (Its other failures, a PHI audit at load or a configuration error, are told.)"""
    from airflow.sdk.exceptions import AirflowFailException

    from imaging_dags.tasks import FailuresInRun

    ti = context.get("ti")
    if getattr(ti, "task_id", None) != "load_metadata" or \
            not isinstance(context.get("exception"), AirflowFailException):
        return False
    if isinstance(context.get("exception"), FailuresInRun):
        return True
    try:
        others = [t for t in ti.task.dag.task_ids if t != ti.task_id]
        return bool(others and ti.get_ti_count(dag_id=ti.dag_id, task_ids=others, run_ids=[ti.run_id],
                                               states=["failed", "upstream_failed"]))
    except Exception as exc:  # when unsure, tell
        log.warning("notification: could not count the run's failed tasks (%s)", type(exc).__name__)
        return False


def run_summary_facts(context, *, succeeded: bool) -> RunSummary:
    """Counts of the run's studies from the warehouse's ``ledger`` table (rows this run set)."""
    dag = context.get("dag")
    dag_id = getattr(dag, "dag_id", None) or context["ti"].dag_id
    run_id = context.get("run_id") or context["dag_run"].run_id
    base = {"dag_id": dag_id, "run_id": run_id, "succeeded": succeeded, "reason": context.get("reason")}
    try:
        rows = _ledger_rows(dag_id, run_id)
    except Exception as exc:
        log.warning("notification: could not read the ledger of %s run %s (%s)", dag_id, run_id, type(exc).__name__)
        return RunSummary(**base, ledger_note=type(exc).__name__)
    quarantined: dict[str, int] = {}
    failed = []
    loaded = 0
    for study, state, step, reason in rows:
        if state == "loaded":
            loaded += 1
        elif state == "quarantined":
            quarantined[reason or "unknown"] = quarantined.get(reason or "unknown", 0) + 1
        elif state == "failed":
            failed.append((study, step or "?", reason or "unknown"))
    return RunSummary(**base, loaded=loaded, quarantined=quarantined, failed=tuple(sorted(failed)[:FAILED_LISTED]),
                      failed_count=len(failed))


def _ledger_rows(specialty: str, run_id: str) -> list[tuple]:
    from airflow.sdk import Variable

    from imaging_dags.settings import for_specialty
    from imaging_dags.warehouse_hook import WarehouseHook

    settings = for_specialty(specialty)
    warehouse = WarehouseHook(settings.warehouse_uri,
                              Variable.get("imaging_gcp_conn_id", default="google_cloud_default")).get_conn()
    return warehouse.query(f"SELECT study_id, state, step, reason FROM {warehouse.ref('ledger')} "
                           "WHERE specialty = ? AND run_id = ?", [specialty, run_id])


def ui_base_url() -> str:
    """Airflow's ``[api] base_url`` (what its own log links use), else the api-server's default address."""
    from airflow.configuration import conf

    return conf.get("api", "base_url", fallback="") or "http://localhost:8080"


# ------------------------------------------------------------------------------------------------- delivery
class NotificationError(RuntimeError):
    """A channel is configured but could not be served; the message says what to set."""


def _check_connection(conn_id: str, variable: str, example: str):
    """The connection ``conn_id``, or :class:`NotificationError` saying what to set."""
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return Connection.get(conn_id)
    except AirflowNotFoundException:
        raise NotificationError(
            f"Variable {variable} names the Airflow connection {conn_id!r}, which is not defined: define it (e.g. "
            f"AIRFLOW_CONN_{conn_id.upper()}='{example}') or unset {variable} to send nothing there") from None


def send_email(message: Message, *, conn_id: str, to: list[str], from_email: str | None, context) -> None:
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier

    conn = _check_connection(conn_id, "imaging_notify_smtp_conn_id",
                             '{"conn_type": "smtp", "host": "mail.example.org", "port": 587, '
                             '"extra": {"from_email": "airflow@example.org"}}')
    from_email = from_email or conn.extra_dejson.get("from_email")
    if not from_email:
        raise NotificationError(f"no sender address: set Variable imaging_notify_email_from, or the extra "
                                f"\"from_email\" of the connection {conn_id!r}")
    # every field given and notify(), not __call__: the subject and body are final text, no Jinja renders them
    SmtpNotifier(to=to, from_email=from_email, subject=message.subject, html_content=message.html,
                 smtp_conn_id=conn_id).notify(context)


def send_webhook(message: Message, *, conn_id: str, context) -> None:
    from airflow.providers.slack.notifications.slack_webhook import SlackWebhookNotifier

    _check_connection(conn_id, "imaging_notify_webhook_conn_id",
                      '{"conn_type": "slackwebhook", "host": "https://hooks.slack.com/services", '
                      '"password": "T000/B000/XXXX"}')
    SlackWebhookNotifier(slack_webhook_conn_id=conn_id, text=f"*{message.subject}*\n{message.text}",
                         unfurl_links=False, timeout=30).notify(context)


def deliver(message: Message, channels, context) -> int:
    """Send ``message`` on every configured channel; each is tried even if another fails; returns how many
    were sent, raising :class:`NotificationError` afterwards if one could not be."""
    errors, sent = [], 0
    if channels.email_to:
        try:
            send_email(message, conn_id=channels.smtp_conn_id, to=list(channels.email_to),
                       from_email=channels.email_from, context=context)
            sent += 1
        except Exception as exc:
            errors.append(f"email: {exc}" if isinstance(exc, NotificationError) else
                          f"email via connection {channels.smtp_conn_id!r}: {type(exc).__name__}: {exc}")
    if channels.webhook_conn_id:
        try:
            send_webhook(message, conn_id=channels.webhook_conn_id, context=context)
            sent += 1
        except Exception as exc:
            errors.append(f"webhook: {exc}" if isinstance(exc, NotificationError) else
                          f"webhook via connection {channels.webhook_conn_id!r}: {type(exc).__name__}: {exc}")
    if errors:
        raise NotificationError("imaging notification not sent: " + "; ".join(errors))
    return sent


# ------------------------------------------------------------------------------------------------- the notifiers
class ImagingNotifier(BaseNotifier):
    """One Airflow callback: ``ImagingNotifier("task_failure")``, ``("run_succeeded")`` or ``("run_failed")``."""

    EVENTS = ("task_failure", "run_succeeded", "run_failed")

    def __init__(self, event: str):
        if event not in self.EVENTS:
            raise ValueError(f"unknown notification event {event!r}; one of {', '.join(self.EVENTS)}")
        super().__init__()
        self.event = event

    def __repr__(self) -> str:
        return f"ImagingNotifier({self.event!r})"

    def render_template_fields(self, context, jinja_env=None) -> None:
        """Nothing to render: the message is final text (and no Jinja may interpret it).  Also spares
        ``dag.test()``, whose DAG callbacks get a serialized DAG that has no template environment."""

    def notify(self, context) -> None:
        from imaging_dags.settings import notify_channels

        channels = notify_channels()
        if not channels:
            return
        if self.event == "task_failure" and told_by_the_summary(context):
            return
        if self.event == "task_failure":
            facts = task_failure_facts(context)
        else:
            facts = run_summary_facts(context, succeeded=self.event == "run_succeeded")
        message = compose(facts, base_url=ui_base_url())
        sent = deliver(message, channels, context)
        log.info("notification sent (%d channel(s)): %s", sent, message.subject)


notify_task_failure = ImagingNotifier("task_failure")
notify_run_succeeded = ImagingNotifier("run_succeeded")
notify_run_failed = ImagingNotifier("run_failed")
