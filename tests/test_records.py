"""Record readers for the seeds' dataset shapes, local and on S3."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from medray import storage
from medray.data import (CaptionRecord, ChatCollator, ConversationRecord, Example, MCQARecord,
                         RecordError, VQARecord, load_image, read_records)
from medray.models import load_processor, family_of
from medray.models.loading import read_config


def _jsonl(rows) -> str:
    return "\n".join(json.dumps(r) for r in rows) + "\n"


def test_llava_conversations(tmp_path):
    rows = [{"id": "pmc-1", "image": "figs/1.jpg", "conversations": [
        {"from": "human", "value": "What does the figure show?\n<image>"},
        {"from": "gpt", "value": "A CT scan of the abdomen."},
        {"from": "human", "value": "Any lesion?"},
        {"from": "gpt", "value": "A hypodense lesion in the liver."}]},
        {"id": "text-only", "conversations": [{"from": "human", "value": "Define edema."},
                                              {"from": "gpt", "value": "Swelling by fluid."}]}]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    recs = read_records(str(tmp_path / "train.json"))
    assert [type(r) for r in recs] == [ConversationRecord, ConversationRecord]
    first = recs[0]
    assert first.image == str(tmp_path / "figs" / "1.jpg")  # relative to the records file
    msgs = first.to_messages()
    assert msgs[0] == {"role": "user", "content": [{"type": "image"},
                                                   {"type": "text", "text": "What does the figure show?"}]}
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert msgs[2]["content"] == [{"type": "text", "text": "Any lesion?"}]
    assert first.to_messages(with_answer=False)[-1]["role"] == "user"
    assert recs[1].images() == [] and recs[1].to_messages()[0]["content"][0]["type"] == "text"


def test_vqa_rad_and_slake_native_forms_from_s3(bucket):
    rad = [{"qid": 1, "image_name": "synpic100.jpg", "image_organ": "CHEST", "question": "Is there a mass?",
            "answer": "No", "answer_type": "CLOSED", "question_type": "PRES"},
           {"qid": 2, "image_name": "synpic101.jpg", "question": "Where is the lesion?",
            "answer": "left lung", "answer_type": "OPEN"}]
    storage.write_text(f"{bucket}/vqa-rad/test.jsonl", _jsonl(rad))
    recs = read_records(f"{bucket}/vqa-rad/test.jsonl")
    assert all(isinstance(r, VQARecord) for r in recs)
    assert [(r.id, r.answer_type, r.answer) for r in recs] == [("1", "CLOSED", "No"), ("2", "OPEN", "left lung")]
    assert recs[0].image == f"{bucket}/vqa-rad/synpic100.jpg"

    slake = [{"img_id": 7, "img_name": "xmlab7/source.jpg", "question": "Which organ is abnormal?",
              "answer": "Lung", "q_lang": "en", "answer_type": "open", "modality": "CT"}]
    storage.write_text(f"{bucket}/slake/test.json", json.dumps(slake))
    (rec,) = read_records(f"{bucket}/slake/test.json", image_root=f"{bucket}/slake/imgs")
    assert rec.answer_type == "OPEN" and rec.image == f"{bucket}/slake/imgs/xmlab7/source.jpg"


def test_llava_med_downstream_test_json_form(tmp_path):
    rows = [{"id": "q9", "image": "/data/path/img9.jpg", "answer_type": "CLOSED", "conversations": [
        {"from": "human", "value": "<image>\nIs this a normal chest?"}, {"from": "gpt", "value": "yes"}]}]
    (tmp_path / "test.json").write_text(json.dumps(rows))
    (rec,) = read_records(str(tmp_path / "test.json"))
    assert isinstance(rec, VQARecord)
    assert (rec.question, rec.answer, rec.answer_type, rec.image) == \
        ("Is this a normal chest?", "yes", "CLOSED", "/data/path/img9.jpg")


def test_llava_med_question_file_form(tmp_path):
    rows = [{"question_id": 17, "image": "a.png", "text": "What modality is used?"}]
    (tmp_path / "q.jsonl").write_text(_jsonl(rows))
    (rec,) = read_records(str(tmp_path / "q.jsonl"))
    assert isinstance(rec, VQARecord) and rec.id == "17" and rec.answer is None
    assert rec.to_messages()[-1]["role"] == "user"


def test_caption_pairs_parquet_on_s3(bucket):
    buf = io.BytesIO()
    pq.write_table(pa.table({"image": ["PMC1_F1.jpg", "PMC2_F3.jpg"],
                             "caption": ["Axial CT showing a mass.", "H&E stain, 40x."]}), buf)
    storage.write_bytes(f"{bucket}/pmc/pairs.parquet", buf.getvalue())
    recs = read_records(f"{bucket}/pmc/pairs.parquet")
    assert all(isinstance(r, CaptionRecord) for r in recs) and [r.id for r in recs] == ["0", "1"]
    assert recs[1].to_messages()[1]["content"][0]["text"] == "H&E stain, 40x."


def test_multiple_choice_forms(tmp_path):
    medqa = {"question": "Drug of choice?", "options": {"A": "x", "B": "y", "C": "z", "D": "w"},
             "answer_idx": "C", "answer": "z"}
    medmcqa = {"id": "m1", "question": "Which bone?", "opa": "femur", "opb": "tibia", "opc": "ulna",
               "opd": "radius", "cop": 1}  # the hub's 0-based index (test_eval covers both releases)
    (tmp_path / "medqa.jsonl").write_text(_jsonl([medqa]))
    (tmp_path / "medmcqa.jsonl").write_text(_jsonl([medmcqa]))
    (tmp_path / "pubmedqa.json").write_text(json.dumps({"12345": {
        "QUESTION": "Does X cause Y?", "CONTEXTS": ["Background.", "Results."], "final_decision": "maybe"}}))
    (q,) = read_records(str(tmp_path / "medqa.jsonl"))
    (m,) = read_records(str(tmp_path / "medmcqa.jsonl"))
    (p,) = read_records(str(tmp_path / "pubmedqa.json"))
    assert all(isinstance(r, MCQARecord) for r in (q, m, p))
    assert (q.answer, m.answer, m.options["B"], p.answer, p.id) == ("C", "B", "tibia", "C", "12345")
    assert "Context: Background.\nResults." in p.prompt()
    assert q.to_messages()[1]["content"][0]["text"] == "C. z"


def test_bad_input_names_the_file_and_row(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"question": "ok?", "answer": "y"}\n{not json\n')
    with pytest.raises(RecordError, match=r"bad.jsonl line 2"):
        read_records(str(tmp_path / "bad.jsonl"))
    (tmp_path / "mcq.json").write_text(json.dumps([{"question": "q", "options": {"A": "a"}, "answer": "Z"}]))
    with pytest.raises(RecordError, match=r"mcq.json row 0.*not one of the options"):
        read_records(str(tmp_path / "mcq.json"))
    (tmp_path / "odd.json").write_text(json.dumps([{"foo": 1}]))
    with pytest.raises(RecordError, match="cannot tell the record kind"):
        read_records(str(tmp_path / "odd.json"))
    with pytest.raises(RecordError, match="unknown record kind"):
        read_records(str(tmp_path / "odd.json"), kind="tabular")


def test_records_images_and_collator_end_to_end_on_s3(bucket, tiny_dirs):
    buf = io.BytesIO()
    Image.new("RGB", (50, 50), (200, 10, 10)).save(buf, format="PNG")
    storage.write_bytes(f"{bucket}/ds/images/a.png", buf.getvalue())
    storage.write_text(f"{bucket}/ds/train.jsonl", _jsonl([
        {"id": "a", "image": "images/a.png", "question": "Is there an opacity?", "answer": "yes",
         "answer_type": "CLOSED"}]))
    (rec,) = read_records(f"{bucket}/ds/train.jsonl")
    image = load_image(storage.read_bytes(rec.image), rec.image)
    path = tiny_dirs["llava-mistral"]
    proc = load_processor(path, family_of(read_config(path)))
    batch = ChatCollator(proc)([Example(rec.to_messages(), [image], rec.id)])
    labelled = [t for t, lab in zip(batch["input_ids"][0].tolist(), batch["labels"][0].tolist()) if lab != -100]
    assert proc.tokenizer.decode(labelled) == " yes </s>"


def test_a_jsonl_shard_holds_values_where_parquet_holds_json_text(tmp_path):
    """pandas and jq users read a JSONL shard's references and generation as values (a word,
    a list, an object), not as strings holding JSON; readers inside medray get the JSON text
    either format gives, and a JSONL shard written before (text) still reads the same."""
    import pandas as pd

    from medray.data.shards import COLUMNS, read_shard, write_shard

    rows = {c: [""] * 2 for c in COLUMNS}
    rows.update(id=["a", "b"], answer=["no", "left lung"], references=[json.dumps("none"), json.dumps(["left", "lung"])],
                generation=[json.dumps({"max_new_tokens": 6, "temperature": 0.0})] * 2,
                latency_s=[0.1, 0.2], completion_tokens=[1, 2])
    info = write_shard(rows, output=str(tmp_path / "out"), fmt="jsonl")
    raw = [json.loads(line) for line in Path(info.uri).read_text().splitlines()]
    assert [r["references"] for r in raw] == ["none", ["left", "lung"]]
    assert raw[0]["generation"] == {"max_new_tokens": 6, "temperature": 0.0}
    frame = pd.read_json(info.uri, lines=True)
    assert frame.loc[1, "references"] == ["left", "lung"] and frame.loc[0, "generation"]["max_new_tokens"] == 6
    got = read_shard(info.uri)
    assert [r["references"] for r in got] == rows["references"] and got[0]["generation"] == rows["generation"][0]
    # No reference: "" in the row, null in the file.
    rows.update(references=["", ""])
    info = write_shard(rows, output=str(tmp_path / "none"), fmt="jsonl")
    assert json.loads(Path(info.uri).read_text().splitlines()[0])["references"] is None
    assert [r["references"] for r in read_shard(info.uri)] == ["", ""]
    # Written before: JSON text in the file, read as it is.
    old = tmp_path / "old" / "part-0.jsonl"
    old.parent.mkdir()
    old.write_text(json.dumps({**{c: "" for c in COLUMNS}, "id": "a", "references": '"none"',
                               "generation": '{"max_new_tokens": 6}'}) + "\n")
    assert read_shard(str(old))[0]["references"] == '"none"'


def test_a_block_of_rows_has_exactly_the_shard_columns():
    """The generation stage's output is built by `shards.block`, so a column left out or one
    the format does not know fails where the block is made, naming it."""
    from medray.data.shards import COLUMNS, block

    full = {c: [c] for c in COLUMNS}
    assert list(block(**dict(reversed(full.items())))) == COLUMNS  # in the declared order
    with pytest.raises(TypeError, match=r"missing \['latency_s'\], unknown \[\]"):
        block(**{c: v for c, v in full.items() if c != "latency_s"})
    with pytest.raises(TypeError, match=r"unknown \['latency'\]"):
        block(**full, latency=[1.0])
