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
             "DAGs, read from the lake. Quarantined inputs show their reasons only. "
             f'<a href="{h(base)}/patients">Patient timelines</a> (sessions, cognitive scores, progression '
             "predictions).</p>"]
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


# ------------------------------------------------------------------------------------------ charts (inline SVG)
CHART_COLORS = ("#0b61a4", "#c2410c", "#15803d", "#7c3aed", "#b91c1c", "#0e7490")
SVG_NS = "http://www.w3.org/2000/svg"


def _nice_step(span: float, ticks: int = 5) -> float:
    import math

    raw = max(span, 1e-12) / ticks
    base = 10 ** math.floor(math.log10(raw))
    return next(m * base for m in (1, 2, 2.5, 5, 10) if m * base >= raw)


def _date_ticks(start: dt.date, end: dt.date) -> list[dt.date]:
    """1 January of each year in range (every 6 months when the span is under two years; every 2+ years when long)."""
    years = (end - start).days / 365.25
    months = 6 if years < 2 else 12 * max(1, int(years // 8) + (1 if years > 16 else 0))
    ticks, year, month = [], start.year, 1 if months >= 12 else (1 if start.month <= 6 else 7)
    while True:
        when = dt.date(year, month, 1)
        if when > end:
            return ticks
        if when >= start:
            ticks.append(when)
        month += months
        year, month = year + (month - 1) // 12, (month - 1) % 12 + 1


def time_chart(title: str, unit: str, series: list[dict], *, x_range: tuple[dt.date, dt.date],
               width: int = 760, height: int = 230, marks: list[tuple[dt.date, str]] = (),
               y_bounds: tuple[float, float] | None = None) -> str:
    """An inline SVG line chart of values over dates, drawn server-side (no script).

    ``series``: dicts with ``label``, ``points`` (``[(date, value, tooltip)]``, in date order), ``kind``
    (``"observed"``: solid line, circles; ``"predicted"``: dashed line, diamonds) and optional ``color`` and
    ``attrs`` (extra ``data-*`` attributes of the series' group).  ``marks``: dotted vertical lines with a label
    (e.g. where a prediction was made from).  Every marker has a ``<title>`` (the browser's tooltip) and the
    class ``point`` plus ``observed`` / ``predicted``; the SVG is well-formed XML.  ``y_bounds``: the values' valid
    range (a score's), which the axis never goes beyond."""
    left, right, top, bottom = 58, 16 + 150, 26, 30
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [v for s in series for _, v, _ in s["points"] if v is not None]
    x0, x1 = x_range
    if x1 <= x0:
        x1 = x0 + dt.timedelta(days=1)
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    pad = (hi - lo) * 0.08 or (abs(hi) * 0.05 or 1.0)
    step = _nice_step(hi - lo + 2 * pad)
    lo, hi = (lo - pad) // step * step, -((-(hi + pad)) // step) * step
    if y_bounds is not None:
        lo, hi = max(lo, y_bounds[0]), min(hi, y_bounds[1])
        hi = hi if hi > lo else lo + step

    def x(day: dt.date) -> float:
        return left + plot_w * (day - x0).days / (x1 - x0).days

    def y(value: float) -> float:
        return top + plot_h * (1 - (value - lo) / (hi - lo))

    out = [f'<svg xmlns="{SVG_NS}" class="chart" role="img" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" aria-label="{h(title)}"><title>{h(title)}</title>',
           f'<text x="{left}" y="16" font-size="13" font-weight="600" fill="#1f2933">{h(title)}'
           f'{h(f" ({unit})") if unit and unit != "1" else ""}</text>',
           f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fbfcfd" stroke="#e4e7eb"/>']
    first = -((-lo) // step) * step  # the first grid value at or above lo
    for i in range(int((hi - first) / step + 1e-9) + 1):
        value = first + i * step
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(value):.1f}" y2="{y(value):.1f}" '
                   f'stroke="#eef0f3"/><text x="{left - 6}" y="{y(value) + 4:.1f}" font-size="11" fill="#616e7c" '
                   f'text-anchor="end">{h(fmt(round(value, 10)))}</text>')
    for tick in _date_ticks(x0, x1):
        out.append(f'<line x1="{x(tick):.1f}" x2="{x(tick):.1f}" y1="{top}" y2="{top + plot_h}" stroke="#eef0f3"/>'
                   f'<text x="{x(tick):.1f}" y="{top + plot_h + 16}" font-size="11" fill="#616e7c" '
                   f'text-anchor="middle">{h(tick.strftime("%Y") if tick.month == 1 else tick.strftime("%Y-%m"))}'
                   "</text>")
    for when, label in marks:
        out.append(f'<g class="mark"><line x1="{x(when):.1f}" x2="{x(when):.1f}" y1="{top}" y2="{top + plot_h}" '
                   f'stroke="#9aa5b1" stroke-dasharray="2 3"/><text x="{x(when) + 3:.1f}" y="{top + 11}" '
                   f'font-size="10" fill="#7b8794">{h(label)}</text></g>')
    for i, s in enumerate(series):
        color = s.get("color") or CHART_COLORS[i % len(CHART_COLORS)]
        kind = s.get("kind", "observed")
        attrs = "".join(f' {k}="{h(v)}"' for k, v in (s.get("attrs") or {}).items())
        pts = [(x(d), y(v), tip) for d, v, tip in s["points"] if v is not None]
        out.append(f'<g class="series {kind}" data-label="{h(s["label"])}"{attrs}>')
        if len(pts) > 1:
            dash = ' stroke-dasharray="6 4"' if kind == "predicted" else ""
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.8"{dash} points="'
                       + " ".join(f"{px:.1f},{py:.1f}" for px, py, _ in pts) + '"/>')
        for px, py, tip in pts:
            if kind == "predicted":
                out.append(f'<path class="point predicted" d="M{px:.1f} {py - 5:.1f}l5 5-5 5-5-5z" fill="#fff" '
                           f'stroke="{color}" stroke-width="1.8"><title>{h(tip)}</title></path>')
            else:
                out.append(f'<circle class="point observed" cx="{px:.1f}" cy="{py:.1f}" r="3.5" fill="{color}">'
                           f"<title>{h(tip)}</title></circle>")
        out.append("</g>")
    for i, s in enumerate(series):  # legend, right of the plot
        color = s.get("color") or CHART_COLORS[i % len(CHART_COLORS)]
        ly = top + 8 + 16 * i
        dash = ' stroke-dasharray="4 3"' if s.get("kind") == "predicted" else ""
        out.append(f'<line x1="{left + plot_w + 10}" x2="{left + plot_w + 28}" y1="{ly}" y2="{ly}" stroke="{color}" '
                   f'stroke-width="2"{dash}/><text x="{left + plot_w + 32}" y="{ly + 4}" font-size="11" '
                   f'fill="#323f4b">{h(s["label"][:26])}</text>')
    if not values:
        out.append(f'<text x="{left + plot_w / 2}" y="{top + plot_h / 2}" font-size="12" fill="#7b8794" '
                   'text-anchor="middle">no values</text>')
    out.append("</svg>")
    return "".join(out)
