"""Records, images and batches: everything between files in storage and model inputs.

    >>> from medray.data import read_records, load_image, ChatCollator, Example
    >>> recs = read_records("s3://bucket/vqa-rad/test.json")          # doctest: +SKIP
    >>> img = load_image(storage.read_bytes(recs[0].image), recs[0].image)  # doctest: +SKIP
    >>> batch = ChatCollator(processor)([Example(recs[0].to_messages(), [img])])  # doctest: +SKIP

Owns: record readers (one alias map), image decoding, the chat collator, the result-shard
format. Must not import: medray.infer, medray.train, medray.eval, medray.serve.

Names are imported on first use (medray._lazy): records and images load no torch.
"""

from medray._lazy import lazy_exports

__all__ = [
    "IGNORE_INDEX", "ChatCollator", "Example", "SampleTooLongError", "assistant_spans",
    "ImageDecodeError", "ImageOptions", "ImageTooLargeError", "dicom_grey_to_uint8", "is_dicom",
    "load_image", "window_linear", "CAPTION_PROMPT", "CaptionRecord", "ImageRecord", "ConversationRecord", "MCQARecord", "Record",
    "RecordError", "VQARecord", "detect_kind", "read_records", "read_rows", "user_message",
]

__getattr__, __dir__ = lazy_exports(__name__, {
    ".collate": ["IGNORE_INDEX", "ChatCollator", "Example", "SampleTooLongError", "assistant_spans"],
    ".images": ["ImageDecodeError", "ImageOptions", "ImageTooLargeError", "dicom_grey_to_uint8", "is_dicom",
                "load_image", "window_linear"],
    ".records": ["CAPTION_PROMPT", "CaptionRecord", "ConversationRecord", "ImageRecord", "MCQARecord", "Record",
                 "RecordError", "VQARecord", "detect_kind", "read_records", "read_rows", "user_message"],
})
