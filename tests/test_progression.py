"""Progression prediction (imaging_tasks.progression): the longitudinal table, the model contract, the reference
LSTM against LOCF and a linear fit on held-out synthetic patients, and pseudonymised score uploads.

Two trainings are shared (module fixtures): the development cohort, and a cohort from a generator with other
noise, visit spacing, amyloid prevalence and ages, trained with the same settings.  Torch runs on one thread.
"""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from imaging_tasks.errors import BadInput, ConfigError
from imaging_tasks.progression import cohort as pc
from imaging_tasks.progression.baselines import predict_baseline
from imaging_tasks.progression.features import (NotEnoughSessions, build_sequences, feature_matrix,
                                                longitudinal_table, pseudonymise_scores, read_scores_upload,
                                                read_session_rows)
from imaging_tasks.progression.model import load_progression_model, predict, predict_many, run_model
from imaging_tasks.progression.train import evaluate, train_progression

torch.set_num_threads(1)
EPOCHS = 30  # enough to beat both baselines clearly; the CLI and the bench default to 60
SHIFTED = pc.CohortParams(amyloid_positive_fraction=0.7, visit_gap_days=(60, 360), age_years=(65.0, 90.0),
                          score_noise=1.7, feature_noise=1.6, missing_score_fraction=0.25, rate_spread=1.5)


def _trained(tmp, params, seed):
    sessions, scores, truth = pc.synthesize_cohort(200, seed=seed, params=params)
    result = train_progression(sessions, scores, seed=0, epochs=EPOCHS, out=tmp / "model", truth=truth)
    model, spec = load_progression_model(result.model_uri)
    return {"result": result, "model": model, "spec": spec, "truth": truth, "sessions": sessions, "scores": scores,
            "eval": evaluate(model, spec, result.sequences, result.test_patients, truth=truth)}


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    return _trained(tmp_path_factory.mktemp("progression-dev"), None, 0)


@pytest.fixture(scope="module")
def shifted(tmp_path_factory):
    return _trained(tmp_path_factory.mktemp("progression-shifted"), SHIFTED, 11)


def _assert_beats_baselines(report):
    mae, mean = report["mae"], report["mean_over_horizons"]
    for score in report["outputs"]:
        for baseline in ("locf", "linear"):
            assert mean["model"][score] < mean[baseline][score], (score, baseline, mean)
            for horizon in ("24", "36"):
                assert mae["model"][score][horizon] < mae[baseline][score][horizon], (score, horizon, baseline, mae)


# ------------------------------------------------------------------------------------------- the cohort

def test_cohort_follows_its_truth():
    sessions, scores, truth = pc.synthesize_cohort(40, seed=3)
    seqs = build_sequences(sessions, scores)
    assert len(seqs) == 40 and set(seqs) == set(truth.patients)
    for pid, seq in seqs.items():
        t = truth.patients[pid]
        assert 2 <= len(seq.sessions) <= 10 and seq.first_date == t.first_date
        assert [s.day for s in seq.sessions] == list(t.session_days)
        assert all(90 <= s.interval_days <= 540 for s in seq.sessions[1:])
    errors = {s: [] for s in pc.SCORES}
    for row in scores:
        seq = seqs[row["patient_id"]]
        day = (np.datetime64(f"{row['date'][:4]}-{row['date'][4:6]}-{row['date'][6:]}")
               - np.datetime64(f"{seq.first_date[:4]}-{seq.first_date[4:6]}-{seq.first_date[6:]}")).astype(int)
        errors[row["score"]].append(row["value"] - truth.scores_at(row["patient_id"], [day])[row["score"]][0])
    for score, sd in (("MMSE", 1.4), ("CDR_SB", 0.8), ("ADAS_Cog", 3.0)):  # noise around the truth, not bias
        assert abs(np.mean(errors[score])) < 0.5 * sd and np.std(errors[score]) < 2.5 * sd, score
    later = truth.horizon_targets(pid, 0, [0, 36], pc.SCORES)  # scores worsen with time
    assert later[1, 0] <= later[0, 0] and later[1, 1] >= later[0, 1] and later[1, 2] >= later[0, 2]
    positive = [t.rate_per_year for t in truth.patients.values() if t.amyloid_positive]
    negative = [t.rate_per_year for t in truth.patients.values() if not t.amyloid_positive]
    assert np.median(positive) > 3 * np.median(negative)
    again = pc.synthesize_cohort(40, seed=3)
    assert again[0] == sessions and again[1] == scores
    assert not set(pc.synthesize_cohort(5, seed=4)[2].patients) & set(truth.patients)


# ------------------------------------------------------------------------------------------- the table

def _session_rows(pid, dates, values, atlas="a"):
    return [{"patient_id": pid, "study_id": f"{pid}-S{i}", "study_date": d, "atlas": atlas, "roi": "hippocampus",
             "metric": "gm_volume", "value": v} for i, (d, v) in enumerate(zip(dates, values))]


def test_longitudinal_table_matches_scores_to_sessions():
    rows = _session_rows("P1", ["20200301", "20200101", "20200601"], [3.0, 3.2, None])  # out of order, one missing
    scores = [{"patient_id": "P1", "date": "2020-01-20", "score": "MMSE", "value": 28},   # visit 0, 19 days after
              {"patient_id": "P1", "date": "20191201", "score": "MMSE", "value": 29},     # 31 days before: farther
              {"patient_id": "P1", "date": "20200410", "score": "CDR-SB", "value": 1.5},  # visit 1 (alias)
              {"patient_id": "P1", "date": "20201201", "score": "MMSE", "value": 20}]     # near no session
    seq = build_sequences(rows, scores)["P1"]
    assert [s.date for s in seq.sessions] == ["20200101", "20200301", "20200601"]
    assert [(s.day, s.interval_days) for s in seq.sessions] == [(0, 0), (60, 60), (152, 92)]
    features = ["roi:hippocampus:gm_volume", "score:MMSE", "score:CDR_SB", "days_since_first", "interval_days"]
    m = feature_matrix(seq, features, min_sessions=2)
    # hippocampus carried forward to the third session; MMSE 28 (nearest) carried; CDR_SB back-filled to visit 0
    np.testing.assert_array_equal(m, np.array([[3.2, 28, 1.5, 0, 0], [3.0, 28, 1.5, 60, 60],
                                               [3.0, 28, 1.5, 152, 92]], np.float32))
    assert feature_matrix(seq, features, min_sessions=2, max_sessions=2)[0, 3] == 60  # time kept after a cut
    table = longitudinal_table({"P1": seq}, features)
    assert [r["study_id"] for r in table] == ["P1-S1", "P1-S0", "P1-S2"] and table[2]["score:MMSE"] == 28
    with pytest.raises(BadInput) as err:
        feature_matrix(seq, ["score:ADAS_Cog"], min_sessions=2)
    assert err.value.reason == "missing_features" and "score:ADAS_Cog" in err.value.message
    two_atlases = rows + _session_rows("P1", ["20200101"], [3.9], atlas="b")
    with pytest.raises(BadInput, match="roi:a:hippocampus:gm_volume"):
        feature_matrix(build_sequences(two_atlases)["P1"], ["roi:hippocampus:gm_volume"], min_sessions=1)
    assert feature_matrix(build_sequences(two_atlases)["P1"], ["roi:b:hippocampus:gm_volume"], min_sessions=1)[0, 0] \
        == np.float32(3.9)
    with pytest.raises(BadInput, match="pseudonym"):  # scores keyed by raw IDs match no session patient
        build_sequences(rows, [{"patient_id": "MRN1", "date": "20200101", "score": "MMSE", "value": 28}])


def test_warehouse_rows_read_from_duckdb(tmp_path):
    from imaging_tasks.warehouse import DuckDBWarehouse

    sessions, scores, _ = pc.synthesize_cohort(3, seed=5)
    store = DuckDBWarehouse(tmp_path / "w.duckdb")
    studies = {r["study_id"]: {"specialty": "neuroimaging", "study_id": r["study_id"], "patient_id": r["patient_id"],
                               "study_date": r["study_date"]} for r in sessions}
    store.upsert("studies", list(studies.values()))
    store.upsert("roi_features", [{k: r[k] for k in ("specialty", "study_id", "atlas", "roi", "metric", "value",
                                                    "unit")} for r in sessions])
    from_warehouse = build_sequences(read_session_rows(tmp_path / "w.duckdb"), scores)
    assert from_warehouse == build_sequences(sessions, scores)
    import duckdb
    import pyarrow as pa

    assert build_sequences(pa.Table.from_pylist(sessions), pa.Table.from_pylist(scores)) == from_warehouse
    con = duckdb.connect(str(tmp_path / "w.duckdb"), read_only=True)
    try:  # a DuckDB relation as it is
        relation = con.sql("SELECT s.patient_id, s.study_id, s.study_date, r.atlas, r.roi, r.metric, r.value "
                           "FROM studies s JOIN roi_features r USING (specialty, study_id)")
        assert build_sequences(relation, scores) == from_warehouse
    finally:
        con.close()


def test_not_enough_sessions(dev):
    model, spec, seqs = dev["model"], dev["spec"], dev["result"].sequences
    one = build_sequences(_session_rows("PONE", ["20200101"], [3.0]))["PONE"]
    with pytest.raises(NotEnoughSessions) as err:
        feature_matrix(one, ["roi:hippocampus:gm_volume"], min_sessions=2)
    assert isinstance(err.value, BadInput) and err.value.reason == "not_enough_sessions"
    assert "1 dated session" in err.value.message and "at least 2" in err.value.message
    pid = dev["result"].test_patients[0]
    single = seqs[pid].prefix(1)
    assert spec.min_sessions == 2
    with pytest.raises(NotEnoughSessions):
        predict(model, spec, single)
    predictions, refused = predict_many(model, spec, [single, seqs[pid]])
    assert refused == [{"patient_id": pid, "reason": "not_enough_sessions", "message": refused[0]["message"]}]
    assert len(predictions) == 15 and {p["patient_id"] for p in predictions} == {pid}


# ------------------------------------------------------------------------------------------- the contract

def test_contract_validation(dev, tmp_path):
    good = json.loads(open(dev["result"].config_uri).read())
    shutil.copy(dev["result"].model_uri, tmp_path / "m.pt")

    def load_with(contract):
        (tmp_path / "m.json").write_text(json.dumps(contract))
        return load_progression_model(tmp_path / "m.pt")

    _, spec = load_with(good)
    assert spec.sha256 == dev["spec"].sha256 and spec.features == tuple(good["features"])
    missing = {k: v for k, v in good.items() if k != "outputs"}
    with pytest.raises(ConfigError, match="missing 'outputs'"):
        load_with(missing)
    short = {**good, "normalization": {"mean": good["normalization"]["mean"][:-1], "std": good["normalization"]["std"]}}
    with pytest.raises(ConfigError) as err:
        load_with(short)
    assert "'normalization.mean' has 12 number(s) but 'features' has 13" in str(err.value)
    both = {**missing, "task": "segmentation", "min_sessions": 3, "max_sessions": 2, "batch": 4}
    with pytest.raises(ConfigError) as err:  # every problem at once
        load_with(both)
    text = str(err.value)
    assert all(s in text for s in ("missing 'outputs'", "'task' is 'segmentation'", "'max_sessions' (2) is below",
                                   "unknown key(s) 'batch'"))
    with pytest.raises(ConfigError, match="feature 'roi:hippocampus' is not one of"):
        load_with({**good, "features": ["roi:hippocampus", *good["features"][1:]]})
    with pytest.raises(ConfigError, match=r"returns \(2, 5, 3\) for 2 patients; its JSON says .* \(2, 4, 3\)"):
        load_with({**good, "horizons_months": [6, 12, 18, 24]})
    torch.save(dev["result"].module.state_dict(), tmp_path / "m.pt")
    with pytest.raises(ConfigError, match="torch.save checkpoint"):
        load_with(good)
    (tmp_path / "m.json").unlink()
    with pytest.raises(ConfigError, match="JSON .* not found"):
        load_progression_model(tmp_path / "m.pt")


def test_scripted_model_equals_the_module_run_by_hand(dev):
    result, model, spec = dev["result"], dev["model"], dev["spec"]
    seqs = [result.sequences[p] for p in result.test_patients[:12]]
    matrices = [feature_matrix(s, spec.features, min_sessions=2, max_sessions=16) for s in seqs]
    lengths = torch.tensor([len(m) for m in matrices])
    x = torch.zeros(len(matrices), int(lengths.max()), len(spec.features))
    for i, m in enumerate(matrices):
        x[i, :len(m)] = torch.from_numpy(spec.normalise(m))
    module = result.module
    with torch.no_grad():
        scripted = model(x, lengths)
        eager = module(x, lengths)
        out, _ = module.lstm(x)  # by hand: the LSTM's output at each patient's last session, its inputs there
        rows = [torch.cat([out[i, n - 1], x[i, n - 1]]) for i, n in enumerate(lengths.tolist())]
        by_hand = module.head(torch.stack(rows)).view(-1, 5, 3) * module.target_std + module.target_mean
        by_hand = torch.maximum(torch.minimum(by_hand, module.high), module.low)
    torch.testing.assert_close(scripted, eager, rtol=0, atol=1e-6)
    torch.testing.assert_close(scripted, by_hand, rtol=0, atol=1e-5)
    assert module.training is False
    records = predict(model, spec, seqs[0])  # the public path feeds the model the same thing
    assert [(r["horizon_months"], r["score"]) for r in records[:4]] == [(6, "MMSE"), (6, "CDR_SB"),
                                                                         (6, "ADAS_Cog"), (12, "MMSE")]
    np.testing.assert_allclose([r["value"] for r in records], scripted[0].numpy().ravel(), atol=1e-5)
    assert all(r["model_name"] == spec.name and r["model_version"] == spec.version == result.contract["version"]
               and r["model_sha256"] == result.sha256 for r in records)
    assert records[-1]["as_of_date"] == seqs[0].sessions[-1].date and records[-1]["target_date"] > records[0][
        "target_date"]
    # padding after a patient's sessions is never read
    padded = torch.cat([x, torch.randn(len(x), 3, x.shape[2])], dim=1)
    torch.testing.assert_close(model(padded, lengths), scripted, rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore:The tensor attributes self.lstm:UserWarning")  # torch.export's own note on LSTM
def test_torch_export_archive_predicts_the_same(dev, tmp_path):
    result, spec = dev["result"], dev["spec"]
    module = result.module
    batch = torch.export.Dim("batch")
    x = torch.zeros(2, spec.max_sessions, len(spec.features))
    program = torch.export.export(module, (x, torch.tensor([spec.max_sessions, 2])),
                                  dynamic_shapes={"x": {0: batch}, "lengths": {0: batch}})
    torch.export.save(program, tmp_path / "m.pt2")
    shutil.copy(result.config_uri, tmp_path / "m.json")
    exported, espec = load_progression_model(tmp_path / "m.pt2")
    assert espec.format == "torch.export" and espec.input_sessions == spec.max_sessions
    seqs = [result.sequences[p] for p in result.test_patients[:8]]
    mats = [feature_matrix(s, spec.features, min_sessions=2, max_sessions=16) for s in seqs]
    np.testing.assert_allclose(run_model(exported, espec, mats), run_model(dev["model"], spec, mats), atol=1e-5)


# ------------------------------------------------------------------------------------------- training

def test_training_is_reproducible(tmp_path):
    sessions, scores, truth = pc.synthesize_cohort(40, seed=7)

    def run(seed, name):
        r = train_progression(sessions, scores, seed=seed, epochs=3, out=tmp_path / name, truth=truth, hidden=8)
        model, spec = load_progression_model(r.model_uri)
        seqs = [r.sequences[p] for p in sorted(r.sequences)]
        return r, predict_many(model, spec, seqs)[0]

    a, pa = run(1, "a")
    b, pb = run(1, "b")
    c, pc_ = run(2, "c")
    for (name, wa), wb in zip(a.module.state_dict().items(), b.module.state_dict().values()):
        assert torch.equal(wa, wb), name
    assert [p["value"] for p in pa] == [p["value"] for p in pb]
    assert a.contract == b.contract and a.contract["version"] != c.contract["version"]
    assert not torch.equal(a.module.lstm.weight_ih_l0, c.module.lstm.weight_ih_l0)
    assert [p["value"] for p in pa] != [p["value"] for p in pc_]
    assert torch.get_num_threads() == 1 and not torch.are_deterministic_algorithms_enabled()  # restored


def test_lstm_beats_locf_and_linear_on_held_out_patients(dev):
    report = dev["eval"]
    assert report["patients"] == 50 and not report["refused"] and report["targets"] == "truth"
    _assert_beats_baselines(report)


def test_lstm_beats_baselines_on_another_generator(dev, shifted):
    """Same trainer and settings on a cohort with noisier scores and images, visits 2-12 months apart, more
    amyloid-positive and older patients, more missing scores and wider rates; and the development model itself
    applied to that cohort's held-out patients (no retraining)."""
    _assert_beats_baselines(shifted["eval"])
    r = shifted["result"]
    transferred = evaluate(dev["model"], dev["spec"], r.sequences, r.test_patients, truth=shifted["truth"])
    _assert_beats_baselines(transferred)


def test_baselines():
    rows = _session_rows("P1", ["20200101", "20210101"], [3.0, 2.9])
    scores = [{"patient_id": "P1", "date": "20200101", "score": "MMSE", "value": 28},
              {"patient_id": "P1", "date": "20210101", "score": "MMSE", "value": 26},
              {"patient_id": "P1", "date": "20210101", "score": "CDR_SB", "value": 2}]
    seq = build_sequences(rows, scores)["P1"]
    horizons = [6, 12, 240]
    locf = predict_baseline("locf", seq, horizons, ["MMSE", "CDR_SB", "ADAS_Cog"])
    np.testing.assert_array_equal(locf[:, :2], [[26, 2]] * 3)
    assert np.isnan(locf[:, 2]).all()
    linear = predict_baseline("linear", seq, horizons, ["MMSE", "CDR_SB"])
    slope = -2 / 366
    np.testing.assert_allclose(linear[:2, 0], 26 + slope * np.array([6, 12]) * 365.25 / 12)
    assert linear[2, 0] == 0  # clipped to the scale
    np.testing.assert_array_equal(linear[:, 1], [2, 2, 2])  # one point: LOCF


# ------------------------------------------------------------------------------------------- uploads

def test_score_upload_is_pseudonymised_and_lines_up_with_study_dates(tmp_path):
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    from imaging_tasks.deid.dicom import deidentify_dataset

    key = b"progression-test-key-0123456789"
    sessions, scores, truth = pc.synthesize_cohort(8, seed=9, key=key)
    raw = truth.raw_score_rows()
    raw_ids = {r["patient_id"] for r in raw}
    with open(tmp_path / "scores.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["patient_id", "date", "score", "value"])
        writer.writeheader()
        writer.writerows(raw)
    uploaded = read_scores_upload(tmp_path / "scores.csv", key)
    assert uploaded == scores  # the cohort's own pseudonymised rows
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(raw), tmp_path / "scores.parquet")
    assert read_scores_upload(tmp_path / "scores.parquet", key) == scores
    seqs = build_sequences(sessions, uploaded)
    table = longitudinal_table(seqs, pc.FEATURES)
    blob = json.dumps([uploaded, table])
    assert not any(r in blob for r in raw_ids) and "MRN" not in blob
    # every score lands at its own visit: 14 days before to 30 after that session's shifted study date
    for seq in seqs.values():
        matched = seq.matched_scores()
        assert sum(len(m) for m in matched) == len(seq.scores)
        assert all(-14 <= o.day - s.day <= 30 for s, m in zip(seq.sessions, matched) for o in m.values())

    # the DICOM de-identifier itself puts a study of that patient on the same shifted day and pseudonym
    row = raw[0]
    ds = Dataset()
    ds.PatientID, ds.PatientName, ds.StudyDate = f" {row['patient_id']} ", "Doe^Jane", row["date"].replace("-", "")
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.SOPClassUID, ds.Modality = "1.2.840.10008.5.1.4.1.1.4", "MR"
    out = deidentify_dataset(ds, key)
    (first,) = pseudonymise_scores([{"Patient_ID": row["patient_id"], "DATE": row["date"], "score": "mmse",
                                     "value": "27"}], key)
    assert (first["patient_id"], first["date"], first["score"]) == (out.PatientID, out.StudyDate, "MMSE")

    with pytest.raises(BadInput) as err:  # errors name the row, never the raw ID or date
        pseudonymise_scores([*raw[:3], {"patient_id": "MRN-SECRET-1", "date": "31/12/2020", "score": "MMSE",
                                        "value": 20}], key)
    assert "row 4" in err.value.message and "SECRET" not in str(err.value) and "2020" not in str(err.value)
    with pytest.raises(BadInput, match="MMSE 31.0 is outside its range 0-30"):
        pseudonymise_scores([{"patient_id": "MRN-X", "date": "20200101", "score": "MMSE", "value": 31}], key)
    with pytest.raises(BadInput, match="lacks column"):
        read_scores_upload(_write(tmp_path / "bad.csv", "id,date,score,value\n1,20200101,MMSE,2\n"), key)


def _write(path, text):
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------- CLI

def test_cli_train_progression(tmp_path, monkeypatch, capsys):
    from imaging_tasks.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["train-progression", "--out", "models/progression", "--patients", "40", "--epochs", "2",
                 "--hidden", "8"]) == 0
    out = capsys.readouterr().out
    assert "| score | horizon (months) | n | model (LSTM) | LOCF | linear |" in out and "| ADAS_Cog | 36 |" in out
    assert (tmp_path / "models" / "progression.pt").is_file()
    contract = json.loads((tmp_path / "models" / "progression.json").read_text())
    assert contract["task"] == "progression" and contract["horizons_months"] == [6, 12, 18, 24, 36]
    assert main(["train-progression", "--out", "m", "--sessions", "nothing.csv"]) == 2
    assert "--sessions needs --scores" in capsys.readouterr().err


def test_cli_train_progression_on_uploaded_rows(tmp_path, monkeypatch, capsys):
    """Session rows exported from the warehouse and a raw score upload (pseudonymised with the key in force: the
    tests' demo key); targets are then the observed follow-up scores."""
    from imaging_tasks.cli import main
    from imaging_tasks.deid.keys import DEMO_KEY

    sessions, _, truth = pc.synthesize_cohort(40, seed=1, key=DEMO_KEY)
    for name, rows in (("sessions.csv", sessions), ("scores.csv", truth.raw_score_rows())):
        with open(tmp_path / name, "w", newline="") as fh:
            writer = csv.DictWriter(fh, list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    monkeypatch.chdir(tmp_path)
    assert main(["train-progression", "--out", "observed", "--sessions", "sessions.csv", "--scores", "scores.csv",
                 "--epochs", "2", "--hidden", "8", "--demo-key"]) == 0
    out = capsys.readouterr().out
    assert "held-out MAE vs observed scores, 10 patient(s)" in out and "sessions.csv + scores.csv" in out
    assert json.loads((tmp_path / "observed.json").read_text())["x_training"]["targets"] == "observed"
