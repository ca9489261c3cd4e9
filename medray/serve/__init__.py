"""Ray Serve: an OpenAI-compatible REST endpoint over medray models.

    serve run medray.serve:build_app models='[{"name": "tiny", "uri": "tiny://llava-mistral"}]'

`build_app(args)` takes the application's `args` block (see ServeConfig).

Owns: the Serve app (ingress, OpenAI surface, image intake, model deployments, job API,
metrics). Must not import: medray.train, medray.cli.

Names are imported on first use (medray._lazy): reading a config loads no Ray Serve.
"""

from medray._lazy import lazy_exports

__all__ = ["build_app", "Autoscaling", "JobsConfig", "Limits", "ModelSpec", "ServeConfig"]

__getattr__, __dir__ = lazy_exports(__name__, {
    ".app": ["build_app"],
    ".config": ["Autoscaling", "JobsConfig", "Limits", "ModelSpec", "ServeConfig"],
})
