"""Server-rendered HTML of the QC pages: small, inline CSS, no scripts, every value escaped.

Links are absolute paths built from the request's root path (``base``: where the app is mounted, including the
api-server's ``[api] base_url`` prefix), so the pages work behind a proxy and inside the UI's iframe; links into
the Airflow UI itself (``ui_root``) open in the top window.
"""
from __future__ import annotations

import datetime as dt
import json
from html import escape
from urllib.parse import quote, urlencode

from imaging_dags.qc import seg

MAX_FINDINGS = 200
MAX_FINDING_COLUMNS = 12
MAX_LISTED_PATHS = 50

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;padding:16px 20px;color:#1f2933;
background:#fff}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:22px 0 8px;border-bottom:1px solid #e4e7eb;padding-bottom:4px}
a{color:#0b61a4;text-decoration:none}a:hover{text-decoration:underline}
nav{font-size:13px;color:#616e7c;margin-bottom:10px}nav a{margin-right:4px}
table{border-collapse:collapse;margin:4px 0 8px;font-size:13px}
th,td{border-bottom:1px solid #e4e7eb;padding:4px 10px 4px 0;text-align:left;vertical-align:top}
th{color:#52606d;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;border-radius:9px;padding:0 8px;font-size:12px;background:#e4e7eb;color:#323f4b}
.published,.success,.ok{background:#d9f2e1;color:#14532d}.quarantined{background:#fdf0d5;color:#7c4a03}
.failed,.upstream_failed{background:#fde2e1;color:#8a1c1c}.running,.queued,.scheduled,.up_for_retry,.deferred
{background:#dbeafe;color:#1e3a8a}.demo{background:#fde2e1;color:#8a1c1c}
.muted{color:#7b8794}code{font-size:12px;background:#f5f7fa;padding:0 3px;border-radius:3px}
figure{display:inline-block;margin:0 14px 14px 0;vertical-align:top}figure img{max-width:min(100%,720px);
border:1px solid #e4e7eb;background:#000}figcaption{font-size:12px;color:#616e7c}
img.thumb{max-height:72px;max-width:140px;border:1px solid #e4e7eb;background:#000;vertical-align:middle}
details summary{cursor:pointer;color:#52606d}ul.paths{margin:2px 0;padding-left:18px;font-size:12px}
""".replace("\n", "")


def h(value) -> str:
    return escape("" if value is None else str(value), quote=True)


# ------------------------------------------------------------------------------------------ URLs
def run_url(base: str, dag_id: str, run_id: str) -> str:
    return f"{base}/dags/{seg(dag_id)}/runs/{seg(run_id)}"


def study_url(base: str, dag_id: str, patient: str, study: str, run_id: str | None = None) -> str:
    url = f"{base}/dags/{seg(dag_id)}/studies/{seg(patient)}/{seg(study)}"
    return url + ("?" + urlencode({"run_id": run_id}) if run_id else "")


def file_url(base: str, dag_id: str, patient: str, study: str, name: str) -> str:
    return f"{base}/dags/{seg(dag_id)}/studies/{seg(patient)}/{seg(study)}/files/{quote(name, safe='/')}"


def ui_run_url(ui_root: str, dag_id: str, run_id: str) -> str:
    return f"{ui_root}/dags/{seg(dag_id)}/runs/{seg(run_id)}"


def ui_task_url(ui_root: str, dag_id: str, run_id: str, task_id: str, map_index: int) -> str:
    url = f"{ui_run_url(ui_root, dag_id, run_id)}/tasks/{seg(task_id)}"
    return url + (f"/mapped/{int(map_index)}" if map_index is not None and map_index >= 0 else "")


# ------------------------------------------------------------------------------------------ values
def fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.6g}"
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat(timespec="seconds") if isinstance(value, dt.datetime) else value.isoformat()
    if isinstance(value, (list, dict)):
        text = json.dumps(value, default=str, separators=(",", ":"))
        return text if len(text) <= 80 else text[:77] + "..."
    return str(value)


def fmt_time(value) -> str:
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return value
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return fmt(value)


def fmt_seconds(value) -> str:
    if value is None or value == "":
        return ""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return h(value)
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def badge(status, detail: str = "") -> str:
    status = str(status or "unknown")
    css = "".join(c if c.isalnum() or c == "_" else "-" for c in status)
    text = f'<span class="badge {css}">{h(status)}</span>'
    return text + (f' <span class="muted">{h(detail)}</span>' if detail else "")


def table(headers: list[str], rows: list[list[str]], *, numeric: set[int] = frozenset()) -> str:
    """``rows`` hold HTML that is already escaped."""
    head = "".join(f"<th>{h(c)}</th>" for c in headers)
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def page(title: str, body: str, *, crumbs: list[tuple[str, str | None]]) -> str:
    nav = " › ".join(f'<a href="{h(url)}">{h(text)}</a>' if url else h(text) for text, url in crumbs)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{h(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><meta name="referrer" '
            f'content="no-referrer"><style>{CSS}</style></head><body><nav>{nav}</nav>{body}</body></html>')


# ------------------------------------------------------------------------------------------ pages
def index_page(base: str, ui_root: str, dags: list[tuple[str, list[dict] | None]]) -> str:
    parts = ['<h1>Imaging QC</h1><p class="muted">QC pictures, metrics, findings and lineage of the imaging '
             "DAGs, read from the lake. Quarantined inputs show their reasons only.</p>"]
    for dag_id, runs in dags:
        parts.append(f'<h2>{h(dag_id)} <a class="muted" target="_top" href="{h(ui_root)}/dags/{h(seg(dag_id))}">'
                     "(DAG in Airflow)</a></h2>")
        if runs is None:
            parts.append('<p class="muted">No read access to this DAG.</p>')
            continue
        if not runs:
            parts.append('<p class="muted">No runs yet.</p>')
            continue
        rows = [[f'<a href="{h(run_url(base, dag_id, r["run_id"]))}">{h(r["run_id"])}</a>', badge(r["state"]),
                 h(r["run_type"]), h(fmt_time(r["run_after"])), h(fmt_time(r["start_date"])),
                 h(fmt_time(r["end_date"]))] for r in runs]
        parts.append(table(["run", "state", "type", "run after", "started", "ended"], rows))
    return page("Imaging QC", "".join(parts), crumbs=[("Imaging QC", None)])


def run_page(base: str, ui_root: str, dag_id: str, run_id: str, run: dict | None, studies: list,
             quarantine: list[dict]) -> str:
    parts = [f"<h1>{h(dag_id)} · run {h(run_id)}</h1>"]
    if run:
        parts.append(f'<p>{badge(run["state"])} {h(run["run_type"])} · started {h(fmt_time(run["start_date"]))}'
                     f' · ended {h(fmt_time(run["end_date"])) or "–"} · <a target="_top" '
                     f'href="{h(ui_run_url(ui_root, dag_id, run_id))}">open the run in Airflow</a></p>')
    else:
        parts.append('<p class="muted">This run is not in the metadata DB (only its lineage in the lake).</p>')
    parts.append(f"<h2>Studies ({len(studies)})</h2>")
    if not studies:
        parts.append('<p class="muted">No study in this run (nothing new had arrived, or the run has not indexed '
                     "the landing bucket yet).</p>")
    else:
        rows = []
        for s in studies:
            link = (f'<a href="{h(study_url(base, dag_id, s.patient, s.study, run_id))}">{h(s.study)}</a>'
                    if s.patient else h(s.study))
            thumb = (f'<a href="{h(study_url(base, dag_id, s.patient, s.study, run_id))}"><img class="thumb" '
                     f'loading="lazy" alt="QC {h(s.study)}" '
                     f'src="{h(file_url(base, dag_id, s.patient, s.study, s.picture))}"></a>'
                     if s.picture and s.patient else "")
            metrics = "<br>".join(f"{h(m.get('name'))} = {h(fmt(m.get('value')))} {h(m.get('unit') or '')}"
                                  for m in s.metrics[:3])
            rows.append([link, h(s.patient or ""), badge(s.status, s.detail), metrics, thumb, h(s.device or ""),
                         h(fmt_seconds(s.duration_s))])
        parts.append(table(["study", "patient", "status", "key metrics", "QC", "device", "processing"], rows))
    parts.append(quarantine_section(quarantine, run))
    parts.append(f'<p class="muted"><a href="{h(run_url(base, dag_id, run_id))}/run.json">run.json</a></p>')
    return page(f"{dag_id} {run_id}", "".join(parts),
                crumbs=[("Imaging QC", f"{base}/"), (dag_id, None), (run_id, None)])


def quarantine_section(rows: list[dict], run: dict | None) -> str:
    out = [f"<h2>Quarantine of this specialty ({len(rows)})</h2>",
           '<p class="muted">Inputs the pipeline refused, with the reason; their contents and original locations '
           "stay in the quarantine zone. ● = quarantined while this run was going.</p>"]
    if not rows:
        return "".join(out) + '<p class="muted">Nothing quarantined.</p>'
    start, end = (run or {}).get("start_date"), (run or {}).get("end_date")
    body = []
    for r in rows:
        when = r.get("quarantined_at")
        mark = "●" if _within(when, start, end) else ""
        body.append([h(mark), h(fmt_time(when)), h(r.get("stage")), h(r.get("reason")), h(r.get("message")),
                     f'<code>{h(r.get("sha_prefix"))}</code>'])
    return "".join(out) + table(["", "quarantined", "stage", "reason", "message", "sha256"], body)


def _within(when, start, end) -> bool:
    if not when or not start:
        return False
    try:
        t = dt.datetime.fromisoformat(str(when).replace("Z", "+00:00"))
    except ValueError:
        return False
    return start <= t and (end is None or t <= end)


def study_page(base: str, ui_root: str, dag_id: str, patient: str, study: str, *, manifest: dict | None,
               pictures: list[dict], others: list[dict], results: dict, deid: dict | None, lineage: list[dict],
               run_id: str | None) -> str:
    parts = [f"<h1>{h(dag_id)} · study {h(study)}</h1><p>patient {h(patient)}"]
    if deid and deid.get("demo_key"):
        parts.append(' · <span class="badge demo">DEMO KEY</span> (public demo key: synthetic data only)')
    if manifest:
        parts.append(f' · code {h(manifest.get("code_version"))} · fingerprint '
                     f'<code>{h(str(manifest.get("fingerprint") or "")[:12])}</code> · '
                     f'<a href="{h(study_url(base, dag_id, patient, study))}/study.json">study.json</a>')
    parts.append("</p>")
    if manifest is None:
        parts.append('<p>No published results: the study has not been processed (yet), or it was quarantined. '
                     "Its lineage below says which steps ran.</p>")
    else:
        parts.append(f"<h2>QC pictures ({len(pictures)})</h2>")
        parts.append("".join(
            f'<figure><a href="{h(file_url(base, dag_id, patient, study, p["path"]))}"><img loading="lazy" '
            f'alt="{h(p["path"])}" src="{h(file_url(base, dag_id, patient, study, p["path"]))}"></a>'
            f'<figcaption>{h(p["path"])}</figcaption></figure>' for p in pictures)
            or '<p class="muted">This study has no QC picture.</p>')
        metrics = [m for m in results.get("metrics") or [] if isinstance(m, dict)]
        parts.append(f"<h2>Metrics ({len(metrics)})</h2>")
        parts.append(table(["metric", "value", "unit"],
                           [[h(m.get("name")), h(fmt(m.get("value"))), h(m.get("unit") or "")] for m in metrics],
                           numeric={1}) if metrics else '<p class="muted">No metrics.</p>')
        parts.append(findings_section(results.get("findings") or []))
        if others:
            parts.append("<h2>Other outputs</h2>" + table(
                ["file", "bytes", "sha256"],
                [[f'<a href="{h(file_url(base, dag_id, patient, study, o["path"]))}">{h(o["path"])}</a>',
                  h(o.get("bytes")), f'<code>{h(str(o.get("sha256") or "")[:12])}</code>'] for o in others],
                numeric={1}))
    if deid:
        parts.append("<h2>De-identified inputs</h2>" + table(
            ["instances", "series", "modalities", "bytes", "key"],
            [[h(deid["instances"]), h(deid["series"]), h(", ".join(deid["modalities"])), h(deid["bytes"]),
              "public DEMO key" if deid["demo_key"] else "configured key"]], numeric={0, 1, 3}))
    parts.append(lineage_section(base, ui_root, dag_id, lineage, run_id))
    crumbs = [("Imaging QC", f"{base}/"), (dag_id, None)]
    if run_id:
        crumbs.append((run_id, run_url(base, dag_id, run_id)))
    return page(f"{dag_id} {study}", "".join(parts), crumbs=crumbs + [(study, None)])


def findings_section(findings: list) -> str:
    findings = [f for f in findings if isinstance(f, dict)]
    out = f"<h2>Findings ({len(findings)})</h2>"
    if not findings:
        return out + '<p class="muted">No findings.</p>'
    columns: list[str] = [c for c in ("index", "kind") if any(c in f for f in findings)]
    for f in findings:
        columns += [k for k in f if k not in columns]
    columns = columns[:MAX_FINDING_COLUMNS]
    rows = [[h(fmt(f.get(c))) for c in columns] for f in findings[:MAX_FINDINGS]]
    numeric = {i for i, c in enumerate(columns)
               if all(isinstance(f.get(c), (int, float)) or f.get(c) is None for f in findings[:MAX_FINDINGS])}
    more = (f'<p class="muted">{len(findings) - MAX_FINDINGS} more in results.json.</p>'
            if len(findings) > MAX_FINDINGS else "")
    return out + table(columns, rows, numeric=numeric) + more


def _paths(items: list[dict]) -> str:
    if not items:
        return '<span class="muted">none</span>'
    zones: dict[str, int] = {}
    for item in items:
        zones[item["zone"]] = zones.get(item["zone"], 0) + 1
    summary = ", ".join(f"{n} {zone}" for zone, n in zones.items())
    listed = [i["path"] for i in items if i.get("path")][:MAX_LISTED_PATHS]
    if not listed:
        return h(summary)
    more = len([i for i in items if i.get("path")]) - len(listed)
    return (f"<details><summary>{h(summary)}</summary><ul class=\"paths\">"
            + "".join(f"<li><code>{h(p)}</code></li>" for p in listed)
            + (f"<li class=\"muted\">{more} more</li>" if more > 0 else "") + "</ul></details>")


def lineage_section(base: str, ui_root: str, dag_id: str, rows: list[dict], run_id: str | None) -> str:
    scope = "in this run" if run_id else "in every run"
    out = f"<h2>Lineage {h(scope)} ({len(rows)})</h2>"
    if not rows:
        return out + '<p class="muted">No lineage rows.</p>'
    body = []
    for r in rows:
        rid = str(r.get("run_id") or "")
        task = h(r.get("task_id"))
        if rid and r.get("task_id"):
            task = (f'<a target="_top" href="{h(ui_task_url(ui_root, dag_id, rid, r["task_id"], r.get("map_index")))}">'
                    f"{task}</a>")
        body.append([f'<a href="{h(run_url(base, dag_id, rid))}">{h(rid)}</a>' if rid else "",
                     task + (f' <span class="muted">[{h(r.get("map_index"))}]</span>'
                             if isinstance(r.get("map_index"), int) and r["map_index"] >= 0 else ""),
                     badge(r.get("status")), h(r.get("device") or ""), h(fmt_time(r.get("started_at"))),
                     h(fmt_seconds(r.get("duration_s"))), _paths(r.get("inputs") or []),
                     _paths(r.get("outputs") or []), h(r.get("code_version") or "")])
    return out + table(["run", "task", "status", "device", "started", "duration", "inputs", "outputs", "code"],
                       body)


def message_page(base: str, title: str, text: str, links: list[tuple[str, str]] = (), *,
                 crumbs: list[tuple[str, str | None]] | None = None) -> str:
    more = "".join(f'<li><a href="{h(url)}">{h(label)}</a></li>' for label, url in links)
    body = f"<h1>{h(title)}</h1><p>{h(text)}</p>" + (f"<ul>{more}</ul>" if more else "")
    return page(title, body, crumbs=crumbs or [("Imaging QC", f"{base}/"), (title, None)])
