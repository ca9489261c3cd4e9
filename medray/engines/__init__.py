"""Engines: the models that generate, behind one seam. The batch pipeline (medray.infer), the
Serve replica (medray.serve.model) and `medray ask` call engines through the protocols in
protocol.py and pick them by name from the registry (registry.py), never by asking which runs.

    >>> from medray.engines import ENGINES, choose
    >>> engine, why = choose("vllm", model="s3://models/llava-med/")        # doctest: +SKIP
    >>> load = ENGINES[engine].load_batch()                                  # doctest: +SKIP

Owns: the request, settings and answer types (types.py: torch-free), prompt encoding
(encoding.py), the transformers engine (hf.py, hf_serving.py), the vLLM engine (vllm.py, and
vllm_sizing.py for its sizing), the registry and the adapter rule. Must not import:
medray.data, medray.infer, medray.train, medray.eval, medray.serve, medray.cli.

Names are imported on first use (medray._lazy): the types and the registry load no torch.
"""

from medray._lazy import lazy_exports

__all__ = ["ENGINES", "Engine", "EngineName", "FALLBACK", "adapter_problem", "check_adapters", "choose",
           "BatchEngine", "ServingEngine", "Answer", "Encoded", "GenerationSettings", "Request",
           "RequestRejected", "encode_request", "GenerationEngine"]

__getattr__, __dir__ = lazy_exports(__name__, {
    ".registry": ["ENGINES", "Engine", "EngineName", "FALLBACK", "adapter_problem", "check_adapters", "choose"],
    ".protocol": ["BatchEngine", "ServingEngine"],
    ".types": ["Answer", "Encoded", "GenerationSettings", "Request", "RequestRejected"],
    ".encoding": ["encode_request"],
    ".hf": ["GenerationEngine"],
})
