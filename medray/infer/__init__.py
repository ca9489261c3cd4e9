"""Generation: the engine shared by batch inference, serving and the demo, and the Ray Data
batch pipeline.

    >>> from medray.infer import InferConfig, run_inference
    >>> run_inference(InferConfig(model="tiny://llava-mistral", input="s3://b/scans/",   # doctest: +SKIP
    ...                           output="s3://b/answers/", task="vqa", question="Is there an opacity?"))

Owns: the engine (encode on CPU, generate batched), the pipeline and its options and flags,
visual experts. Must not import: medray.serve, medray.train, medray.cli.

Names are imported on first use (medray._lazy): the request types and options load no torch.
"""

from medray._lazy import lazy_exports

__all__ = ["MAX_NEW_TOKENS", "MAX_TEMPERATURE", "Answer", "Encoded", "GenerationEngine", "GenerationSettings",
           "Request", "RequestRejected", "encode_request", "AllRowsFailed", "InferConfig", "Summary", "add_infer_arguments",
           "infer_config_from_args", "run_inference", "ask", "OutputConflict"]

__getattr__, __dir__ = lazy_exports(__name__, {
    ".ask": ["ask"],
    "medray.engines.hf": ["GenerationEngine"],
    "medray.engines.encoding": ["encode_request"],
    "medray.engines.types": ["MAX_NEW_TOKENS", "MAX_TEMPERATURE", "Answer", "Encoded", "GenerationSettings", "Request",
               "RequestRejected"],
    ".options": ["AllRowsFailed", "InferConfig", "Summary", "add_infer_arguments", "infer_config_from_args"],
    ".pipeline": ["OutputConflict", "run_inference"],
})
