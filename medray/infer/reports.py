"""Answers back to the PACS as DICOM Structured Reports (`--sr-output`).

Each answered row whose image is a DICOMweb instance becomes one Comprehensive SR, built with
highdicom (the maintained library for SR): in the source's study (patient and study copied
from it), referencing the source instance, with the model as the observer device (its URI,
and its content digest as the device's serial number), the question as a Request and the
answer as a Finding. `--sr-output` is a DICOMweb service root (stored with STOW-RS) or a
directory / s3:// prefix (`<study>/<sop>.dcm` files).

Exactly once: an SR's UIDs are derived from the run's output and the source instance (pydicom's
generate_uid with entropy sources), so an SR stored again by a rerun (a batch whose shard was
not written before a crash) is the same instance: the PACS keeps one, a file is overwritten.
SRs are stored before the batch's shard is written, so a row in the output has its SR.
"""

from __future__ import annotations

from medray import storage
from medray.storage import dicomweb

SERIES_NUMBER = 9901  # medray's SR series in a study: one per run
TYPE_2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber")


def build_sr(source: dict, *, question: str, answer: str, model: str, model_digest: str, run: str) -> bytes:
    """The SR file (bytes) of one answer. `source`: the instance's metadata (DICOM JSON)."""
    from io import BytesIO

    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    evidence = pydicom.Dataset.from_json(source)
    # The patient and study modules' Type 2 attributes, which an SR copies from its evidence:
    # present and empty where the source lacks them (Type 2 means present, maybe empty).
    for keyword in TYPE_2_COPIED:
        if keyword not in evidence:
            setattr(evidence, keyword, "")
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=["medray-device", model, model_digest]), name="medray",
        manufacturer_name="medray", model_name=model[:64], serial_number=model_digest[:64])
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    items = [*context,
             hd.sr.TextContentItem(name=codes.DCM.Request, value=question or "(caption)", relationship_type=contains),
             hd.sr.TextContentItem(name=codes.DCM.Finding, value=answer or "(no answer)", relationship_type=contains),
             hd.sr.ImageContentItem(name=codes.DCM.SourceImage, referenced_sop_class_uid=evidence.SOPClassUID,
                                    referenced_sop_instance_uid=evidence.SOPInstanceUID, relationship_type=contains)]
    content = hd.sr.ContainerContentItem(name=codes.LN.DiagnosticImagingReport, template_id="2000")
    content.ContentSequence = items
    sr = hd.sr.ComprehensiveSR(
        evidence=[evidence], content=content,
        series_instance_uid=generate_uid(entropy_srcs=["medray-sr-series", run, evidence.StudyInstanceUID]),
        series_number=SERIES_NUMBER,
        sop_instance_uid=generate_uid(entropy_srcs=["medray-sr", run, evidence.SOPInstanceUID]),
        instance_number=1, manufacturer="medray", series_description=f"medray answers ({model})"[:64],
        is_complete=True, is_final=False, is_verified=False)
    # UTF-8: an answer is any text (a model's output may hold any character, U+FFFD included);
    # the source's character set (often Latin-1, copied by highdicom) would turn it into '?'.
    sr.SpecificCharacterSet = "ISO_IR 192"
    out = BytesIO()
    sr.save_as(out, enforce_file_format=True)
    return out.getvalue()


def write_reports(rows: list[dict], *, sr_output: str, model: str, model_digest: str, run: str) -> dict[str, str]:
    """SRs of `rows` (dicts with id, image, question, answer, error) whose image is a DICOMweb
    instance and that were answered; returns id -> why its SR failed, for the rows that did."""
    failed: dict[str, str] = {}
    made: list[tuple[dict, bytes]] = []
    for row in rows:
        if row["error"] or not dicomweb.is_dicomweb(row["image"]):
            continue
        try:
            made.append((row, build_sr(dicomweb.instance_metadata(row["image"]), question=row["question"],
                                       answer=row["answer"], model=model, model_digest=model_digest, run=run)))
        except Exception as e:  # this row's SR: its answer stays, the row says why it has no SR
            failed[row["id"]] = f"SR: {type(e).__name__}: {e}"
    if not made:
        return failed
    try:
        if dicomweb.is_dicomweb(sr_output):
            dicomweb.store_instances(sr_output, [data for _, data in made])
        else:
            for row, data in made:
                study, _ = dicomweb.uids_of(row["image"])
                storage.write_bytes(storage.join(sr_output, study, f"{row['id']}.dcm"), data)
    except (storage.StorageError, OSError) as e:
        failed.update({row["id"]: f"SR: {type(e).__name__}: {e}" for row, _ in made})
    return failed
