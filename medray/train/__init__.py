"""Curriculum fine-tuning on Ray Train: one loop, DDP / FSDP2 / DeepSpeed, LoRA and QLoRA.

    >>> from medray.train import load_manifest, run_curriculum
    >>> cur = load_manifest("manifests/tiny/llava-med.yaml", ["output=/tmp/run"])  # doctest: +SKIP
    >>> [r.model for r in run_curriculum(cur)]                                     # doctest: +SKIP
    ['/tmp/run/align', '/tmp/run/instruct']

Owns: manifests, the Ray Train driver, the train loop, strategies, freezing and LoRA, export.
Must not import: medray.infer, medray.serve, medray.cli.
"""

from .config import Curriculum, DataConfig, LoraSpec, ManifestError, StageConfig, TrainArgs, load_manifest
from .curriculum import StageConflict, StageResult, run_curriculum

__all__ = ["Curriculum", "DataConfig", "LoraSpec", "ManifestError", "StageConfig", "TrainArgs", "load_manifest",
           "StageConflict", "StageResult", "run_curriculum"]
