"""Storage layout, index grouping, tile batching and warehouse upserts: the shared machinery under every DAG."""
from __future__ import annotations

import datetime as dt
import json

import pytest

from imaging_tasks import storage
from imaging_tasks.errors import BadInput
from imaging_tasks.specialties import get
from imaging_tasks.warehouse import DuckDBWarehouse

UTC = dt.timezone.utc


def test_listing_skips_hidden_and_underscore_paths_and_filters_by_time(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.dcm").write_bytes(b"1")
    (tmp_path / "_truth").mkdir()
    (tmp_path / "_truth" / "t.json").write_text("{}")
    (tmp_path / "a" / ".partial.tmp").write_bytes(b"2")
    found = storage.list_objects(tmp_path)
    assert [o.relpath for o in found] == ["a/x.dcm"]
    later = dt.datetime.now(UTC) + dt.timedelta(hours=1)
    assert storage.list_objects(tmp_path, since=later) == []
    assert len(storage.list_objects(tmp_path.as_uri(), until=later)) == 1  # file:// URIs take the same path


def test_writes_are_atomic_and_manifest_marks_completion(tmp_path):
    dest = tmp_path / "derived" / "S1"
    assert storage.read_manifest(dest) is None
    sha = storage.write_bytes(dest / "out.bin", b"abc")
    assert sha == storage.sha256_bytes(b"abc") and not list(dest.glob(".*tmp"))
    storage.publish_manifest(dest, {"ok": True})
    assert storage.read_manifest(dest) == {"ok": True}


def test_quarantine_is_idempotent_and_its_rows_drop_the_raw_path(tmp_path):
    kwargs = dict(specialty="cardiovascular", reason="not_dicom", message="m", stage="index",
                  source_uri="file:///landing/Doe^Jane/report.pdf", suffix=".pdf")
    row1 = storage.quarantine(b"%PDF", tmp_path, **kwargs)
    row2 = storage.quarantine(b"%PDF", tmp_path, **kwargs)
    assert row1.pop("first_seen") is True and row2.pop("first_seen") is False  # the second call finds it there
    assert row1 == row2
    rows = storage.quarantine_rows(tmp_path, "cardiovascular")
    assert len(rows) == 1 and "source_uri" not in rows[0] and "Doe" not in json.dumps(rows[0])
    folder = tmp_path / "quarantine" / "cardiovascular" / row1["input_sha256"][:16]
    assert (folder / "input.pdf").read_bytes() == b"%PDF"
    assert json.loads((folder / "reason.json").read_text())["source_uri"].endswith("report.pdf")


def test_neuro_session_waits_for_pet_or_the_mr_only_delay():
    now = dt.datetime(2026, 3, 1, 12, tzinfo=UTC)
    fresh = (now - dt.timedelta(hours=1)).isoformat()
    old = (now - dt.timedelta(hours=7)).isoformat()
    neuro = get("neuroimaging")  # the readiness rule lives in the specialty's record
    assert neuro.is_ready({"MR": 3, "PT": 2}, fresh, now)
    assert not neuro.is_ready({"MR": 3}, fresh, now)
    assert neuro.is_ready({"MR": 3}, old, now)
    # PET alone waits as long, then goes on to be quarantined (no_mri) rather than wait for ever
    assert not neuro.is_ready({"PT": 3}, fresh, now)
    assert neuro.is_ready({"PT": 3}, old, now)
    assert neuro.is_ready({"MR": 3}, fresh, now, {"mr_only_wait_hours": 0.5})  # the run's option
    assert get("cardiovascular").is_ready({"CT": 30}, fresh, now)  # no rule: ready when indexed


def test_part_ranges_cover_every_tile_once_at_any_slide_size():
    from imaging_tasks.pathology.features_io import PART_TILES
    from imaging_tasks.pathology.slide_features import part_ranges

    for n in (0, 1, PART_TILES - 1, PART_TILES, PART_TILES + 1, 100_000):
        ranges = part_ranges(n)
        assert sum(b - a for a, b in ranges) == n and all(b - a <= PART_TILES for a, b in ranges)
        assert all(x[1] == y[0] for x, y in zip(ranges, ranges[1:])) and (not ranges or ranges[0][0] == 0)


def test_warehouse_upsert_replaces_by_key_and_scope(tmp_path):
    wh = DuckDBWarehouse(tmp_path / "w.duckdb")
    rows = [{"specialty": "c", "study_id": "S1", "metric": m, "value": v} for m, v in (("a", 1.0), ("b", 2.0))]
    wh.upsert("results", rows, replace_scope=("specialty", "study_id"))
    wh.upsert("results", rows, replace_scope=("specialty", "study_id"))
    assert wh.count("results") == 2
    # reprocessed study now has one metric only: the stale one goes
    wh.upsert("results", [{"specialty": "c", "study_id": "S1", "metric": "a", "value": 5.0}],
              replace_scope=("specialty", "study_id"))
    assert wh.query("SELECT metric, value FROM results") == [("a", 5.0)]
    with pytest.raises(ValueError, match="key column"):
        wh.upsert("results", [{"specialty": "c", "metric": "a"}])


def test_bad_input_carries_a_reason_code():
    exc = BadInput("wrong_modality", "modality MR does not belong here")
    assert exc.reason == "wrong_modality" and "does not belong" in str(exc)
