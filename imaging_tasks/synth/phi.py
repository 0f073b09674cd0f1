"""Realistic PHI for synthetic studies, so de-identification is tested against what hospitals really send.

Every synthetic study carries names, IDs, dates, an institution, nested sequences holding UIDs and
identifiers, and a private block.  ``phi_values`` lists the identifying strings planted, which the PHI
audit and the end-to-end tests search for in every output.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

FAMILY = ["Okafor", "Lindqvist", "Moreau", "Tanaka", "Castellanos", "Novak", "Abernathy", "Delacroix",
          "Fitzgerald", "Haraldsen", "Ivanova", "Kowalczyk", "Marchetti", "Oyelaran", "Quintero", "Sandoval"]
GIVEN = ["Adaeze", "Bjorn", "Camille", "Daichi", "Esperanza", "Frantisek", "Gwendolyn", "Hugo",
         "Ingrid", "Jurgen", "Kseniya", "Leocadia", "Matteo", "Nkechi", "Octavia", "Pilar"]
HOSPITALS = ["St. Brigid Memorial Hospital", "Westmoor University Clinic", "Harbourview Regional Medical Centre",
             "Kestrel Valley Infirmary"]
STREETS = ["14 Larkspur Lane", "271 Quarry Road", "9 Cobblestone Court", "88 Juniper Avenue"]

# UID root for synthetic data ("2.25" + random would also do); fixed so seeds reproduce byte for byte.
SYNTH_UID_ROOT = "1.2.826.0.1.3680043.10.1434."


@dataclass
class Patient:
    name: str
    patient_id: str
    birth_date: str
    sex: str
    age: str
    address: str
    other_id: str


@dataclass
class Study:
    patient: Patient
    study_uid: str
    accession: str
    study_date: str
    study_time: str
    institution: str
    referring: str
    operator: str
    label: str
    frame_of_reference_uid: str
    extra_phi: list[str] = field(default_factory=list)


def _uid(rng: np.random.Generator) -> str:
    return SYNTH_UID_ROOT + ".".join(str(int(x)) for x in rng.integers(1, 2**31, size=3))


def new_uid(rng: np.random.Generator) -> str:
    """A reproducible UID under the synthetic root."""
    return _uid(rng)


def fake_patient(rng: np.random.Generator) -> Patient:
    family, given = FAMILY[rng.integers(len(FAMILY))], GIVEN[rng.integers(len(GIVEN))]
    birth = dt.date(1940, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 55)))
    age = 2026 - birth.year
    return Patient(
        name=f"{family}^{given}",
        patient_id=f"MRN{int(rng.integers(10**7, 10**8))}",
        birth_date=birth.strftime("%Y%m%d"),
        sex=str(rng.choice(["F", "M"])),
        age=f"{age:03d}Y",
        address=STREETS[rng.integers(len(STREETS))],
        other_id=f"NHS{int(rng.integers(10**9, 10**10))}",
    )


def fake_study(rng: np.random.Generator, label: str, patient: Patient | None = None) -> Study:
    patient = patient or fake_patient(rng)
    date = dt.date(2024, 1, 1) + dt.timedelta(days=int(rng.integers(0, 700)))
    return Study(
        patient=patient,
        study_uid=_uid(rng),
        accession=f"ACC{int(rng.integers(10**6, 10**7))}",
        study_date=date.strftime("%Y%m%d"),
        study_time=f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}",
        institution=HOSPITALS[rng.integers(len(HOSPITALS))],
        referring=f"{FAMILY[rng.integers(len(FAMILY))]}^{GIVEN[rng.integers(len(GIVEN))]}^^Dr",
        operator=f"{FAMILY[rng.integers(len(FAMILY))]}^{GIVEN[rng.integers(len(GIVEN))]}",
        label=label,
        frame_of_reference_uid=_uid(rng),
    )


def phi_values(study: Study) -> list[str]:
    """Identifying strings planted in the study; none of them may survive de-identification."""
    p = study.patient
    family, given = p.name.split("^")[:2]
    vals = [p.name, family, given, p.patient_id, p.birth_date, p.address, p.other_id, study.study_uid,
            study.accession, study.institution, study.referring.split("^")[0], study.operator.split("^")[0],
            study.frame_of_reference_uid, *study.extra_phi]
    return sorted(set(vals))


def dicom_dataset(study: Study, *, modality: str, sop_class_uid: str, series_uid: str, sop_uid: str,
                  series_number: int, instance_number: int, series_description: str) -> FileDataset:
    """A DICOM dataset with the study's PHI in the places real scanners put it (top level, nested, private)."""
    p = study.patient
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = SYNTH_UID_ROOT + "1"
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.Modality = modality
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study.study_date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = study.study_time
    ds.AccessionNumber = study.accession
    ds.InstitutionName = study.institution
    ds.InstitutionAddress = p.address + ", Springfield"
    ds.ReferringPhysicianName = study.referring
    ds.OperatorsName = study.operator
    ds.PatientName = p.name
    ds.PatientID = p.patient_id
    ds.PatientBirthDate = p.birth_date
    ds.PatientSex = p.sex
    ds.PatientAge = p.age
    ds.PatientAddress = p.address
    ds.StudyID = study.accession[-5:]
    ds.StudyDescription = f"{modality} study for {p.name.split('^')[0]}"
    ds.SeriesDescription = series_description
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.Manufacturer = "SynthCo"
    ds.StationName = ("SYNTH-" + study.institution.split()[0].upper())[:16]
    ds.DeviceSerialNumber = "SN" + study.accession[-6:]
    other = Dataset()
    other.PatientID = p.other_id
    other.IssuerOfPatientID = study.institution
    ds.OtherPatientIDsSequence = Sequence([other])
    # Nested three deep: request -> referenced study -> referenced SOP, each carrying identifiers.
    ref_sop = Dataset()
    ref_sop.ReferencedSOPClassUID = sop_class_uid
    ref_sop.ReferencedSOPInstanceUID = sop_uid
    ref_study = Dataset()
    ref_study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    ref_study.ReferencedSOPInstanceUID = study.study_uid
    ref_study.ReferencedSOPSequence = Sequence([ref_sop])
    req = Dataset()
    req.AccessionNumber = study.accession
    req.RequestedProcedureID = study.accession[-6:]
    req.ReferencedStudySequence = Sequence([ref_study])
    ds.RequestAttributesSequence = Sequence([req])
    # A vendor private block with PHI in it, as real scanners write.
    block = ds.private_block(0x0029, "SYNTHCO PRIVATE", create=True)
    block.add_new(0x10, "LO", p.name)
    block.add_new(0x11, "LO", p.patient_id)
    ds.PatientIdentityRemoved = "NO"
    return ds


def write_dicom(ds: FileDataset, path: str) -> None:
    ds.save_as(path, enforce_file_format=True)


def new_series_uids(rng: np.random.Generator, n: int) -> list[str]:
    return [_uid(rng) for _ in range(n)]


__all__ = ["Patient", "Study", "fake_patient", "fake_study", "phi_values", "dicom_dataset", "write_dicom",
           "new_uid", "new_series_uids", "SYNTH_UID_ROOT"]
