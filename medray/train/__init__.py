"""Curriculum fine-tuning on Ray Train: one loop, DDP / FSDP2 / DeepSpeed, LoRA and QLoRA.

    >>> from medray.train import load_manifest, run_curriculum
    >>> cur = load_manifest("manifests/tiny/llava-med.yaml", ["output=/tmp/run"])  # doctest: +SKIP
    >>> [r.model for r in run_curriculum(cur)]                                     # doctest: +SKIP
    ['/tmp/run/align', '/tmp/run/instruct']

Owns: manifests, the Ray Train driver, the train loop, strategies, freezing and LoRA, export.
Must not import: medray.infer, medray.serve, medray.cli.

Names are imported on first use (medray._lazy): manifests and their models load no torch.
"""

from medray._lazy import lazy_exports

__all__ = ["Curriculum", "DataConfig", "LoraSpec", "ManifestError", "StageConfig", "TrainArgs", "load_manifest",
           "StageConflict", "StageResult", "run_curriculum"]

__getattr__, __dir__ = lazy_exports(__name__, {
    ".config": ["Curriculum", "DataConfig", "LoraSpec", "ManifestError", "StageConfig", "TrainArgs", "load_manifest"],
    ".curriculum": ["StageConflict", "StageResult", "run_curriculum"],
})
