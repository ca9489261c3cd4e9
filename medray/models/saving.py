"""How medray writes a model directory: one function, so every model it writes (tiny,
converted, trained, merged) is the same kind of directory, and vLLM loads each as it is.

transformers 5's `save_pretrained` stores a LLaVA's CLIP tower as `vision_tower.*`. The
LLaVA checkpoints published on the hub, and vLLM, which reads only that layout, have it as
`vision_tower.vision_model.*` (vLLM fails with "There is no module or parameter named
'vision_tower.embeddings'"). transformers reads both layouts to the same weights, so medray
writes the published one.
"""

from __future__ import annotations

import json
from pathlib import Path

TOWER, HUB_TOWER = "vision_tower.", "vision_tower.vision_model."
INDEX = "model.safetensors.index.json"


def save_model(model, out: str | Path) -> Path:
    """`save_pretrained` (safetensors only), then the published hub layout. The rename
    rewrites only the shards that hold tower tensors (for a 7B LLaVA, the one or two with the
    ~0.3B tower), at the cost of writing those twice."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    to_hub_layout(out)
    return out


def _hub_name(key: str) -> str:
    if key.startswith(TOWER) and not key.startswith(HUB_TOWER):
        return HUB_TOWER + key[len(TOWER):]
    return key


def to_hub_layout(directory: str | Path) -> bool:
    """Rename a LLaVA directory's tower tensors to the hub layout in place; True if any were.
    Other models, and directories already in that layout, are left as they are."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    if config.get("model_type") != "llava":
        return False
    renamed = False
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            keys, metadata = list(f.keys()), f.metadata() or {}
            if all(_hub_name(k) == k for k in keys):
                continue
            tensors = {_hub_name(k): f.get_tensor(k) for k in keys}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={**metadata, "format": "pt"})
        tmp.replace(path)  # never a half-written file under the real name
        renamed = True
    index = directory / INDEX
    if renamed and index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {_hub_name(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))
    return renamed
