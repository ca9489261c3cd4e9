"""Small labelled corpora that a tiny model can learn on a CPU, for tiny manifests, the demo
and tests.

Chest-x-ray-like images hold a bright opacity in the left lung, the right lung or neither.
The answers ("yes"/"no", "left"/"right"/"none") depend only on the image, and a tiny LLaVA
learns them in ~100 steps (see shared/PLATFORM.md). A share of the images is written as
DICOM (16-bit, with a window), so every pipeline also exercises the DICOM path.
Everything is a function of the seed.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
from PIL import Image

from medray import storage

SIDES = ("left", "right", "none")
CAPTIONS = {
    "left": "A chest x-ray showing an opacity in the left lung.",
    "right": "A chest x-ray showing an opacity in the right lung.",
    "none": "A normal chest x-ray with clear lungs.",
}
TEXT_QA = [
    ("Is pneumonia an infection of the lung?", "yes"),
    ("Is the liver in the chest?", "no"),
    ("Is a fracture a broken bone?", "yes"),
    ("Is edema a kind of tumor?", "no"),
    ("Is the heart in the chest?", "yes"),
    ("Is a cyst always a carcinoma?", "no"),
]


def chest_image(side: str, size: int = 64, seed: int = 0) -> np.ndarray:
    """A grey chest-like image (uint8, HxW): dark lungs, and a bright blob in one of them."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size), 90, dtype=np.float64) + rng.normal(0, 6, (size, size))
    yy, xx = np.mgrid[:size, :size]
    for cx in (size * 0.3, size * 0.7):
        lung = ((xx - cx) / (size * 0.16)) ** 2 + ((yy - size * 0.5) / (size * 0.32)) ** 2 <= 1
        img[lung] = 40 + rng.normal(0, 4, int(lung.sum()))
    if side in ("left", "right"):
        # Radiological convention: the patient's left is on the image's right.
        cx = size * (0.7 if side == "left" else 0.3) + rng.uniform(-2, 2)
        cy = size * 0.45 + rng.uniform(-size * 0.1, size * 0.1)
        blob = (xx - cx) ** 2 + (yy - cy) ** 2 <= (size * 0.08) ** 2
        img[blob] = 200
    return np.clip(img, 0, 255).astype(np.uint8)


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def dicom_bytes(arr: np.ndarray, uid_seed: str) -> bytes:
    """A minimal valid 16-bit MONOCHROME2 DICOM whose window shows `arr` unchanged."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    # Stored values = 4 x pixel + 1000, rescaled back by slope/intercept; a window of
    # centre 127.5, width 256 maps the rescaled values onto 0..255 again.
    stored = (arr.astype(np.uint16) * 4 + 1000).astype(np.uint16)
    uid = generate_uid(entropy_srcs=[uid_seed])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, uid
    ds.Modality = "DX"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 0.25, -250
    ds.WindowCenter, ds.WindowWidth = 128, 256
    ds.PixelData = stored.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@dataclass(frozen=True)
class SyntheticCorpus:
    records: str
    """URI of the records JSONL."""
    n: int


def write_synthetic(kind: str, dest: str, *, n: int = 64, seed: int = 0, image_size: int = 64,
                    dicom_fraction: float = 0.25) -> SyntheticCorpus:
    """Write `n` records (and their images) under `dest` (local or s3://); idempotent."""
    records_uri = storage.join(dest, "records.jsonl")
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        rid = f"{kind}-{seed}-{i:05d}"
        if kind in ("text-qa", "mcqa"):
            q, a = TEXT_QA[int(rng.integers(len(TEXT_QA)))]
            if kind == "text-qa":
                rows.append({"id": rid, "question": q, "answer": a, "answer_type": "CLOSED"})
            else:
                rows.append({"id": rid, "question": q, "options": {"A": "yes", "B": "no"},
                             "answer": "A" if a == "yes" else "B"})
            continue
        side = SIDES[int(rng.integers(3))]
        arr = chest_image(side, image_size, seed=seed * 100_003 + i)
        as_dicom = rng.random() < dicom_fraction
        name = f"images/{rid}.{'dcm' if as_dicom else 'png'}"
        data = dicom_bytes(arr, rid) if as_dicom else png_bytes(arr)
        storage.write_bytes(storage.join(dest, name), data)
        opacity = "no" if side == "none" else "yes"
        if kind == "chest-vqa":
            if rng.random() < 0.5:
                rows.append({"id": rid, "image": name, "question": "Is there an opacity?",
                             "answer": opacity, "answer_type": "CLOSED"})
            else:
                rows.append({"id": rid, "image": name, "question": "Where is the opacity?",
                             "answer": side, "answer_type": "OPEN"})
        elif kind == "chest-captions":
            rows.append({"id": rid, "image": name, "caption": CAPTIONS[side]})
        elif kind == "chest-conversations":
            rows.append({"id": rid, "image": name, "conversations": [
                {"from": "human", "value": "<image>\nIs there an opacity?"}, {"from": "gpt", "value": opacity},
                {"from": "human", "value": "Where is the opacity?"}, {"from": "gpt", "value": side}]})
        else:
            raise ValueError(f"unknown synthetic kind {kind!r}")
    storage.write_text(records_uri, "".join(json.dumps(r) + "\n" for r in rows))
    return SyntheticCorpus(records_uri, n)
