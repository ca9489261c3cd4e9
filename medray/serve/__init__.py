"""Ray Serve: an OpenAI-compatible REST endpoint over medray models.

    serve run medray.serve:build_app models='[{"name": "tiny", "uri": "tiny://llava-mistral"}]'

`build_app(args)` takes the application's `args` block (see ServeConfig).

Owns: the Serve app (ingress, OpenAI surface, image intake, model deployments, job API,
metrics). Must not import: medray.train, medray.cli.
"""

from .app import build_app
from .config import Autoscaling, JobsConfig, Limits, ModelSpec, ServeConfig

__all__ = ["build_app", "Autoscaling", "JobsConfig", "Limits", "ModelSpec", "ServeConfig"]
