"""Run in the vLLM environment (.venv-vllm), not the test session's: load model directories
in vLLM exactly as they are on disk and print greedy generations as JSON.

    python tests/_vllm_generate.py job.json > result.json

job.json: {"max_tokens": N, "models": [{"model": dir, "lora": adapter-dir-or-null, "hf_overrides": {...},
           "prompts": [{"question": text, "image": png path, "adapter": bool}]}]}
Each prompt goes through `LLM.chat`, as an OpenAI-style message with the image as a data: URL:
the path of vLLM's OpenAI server, ray.serve.llm and ray.data.llm (the model's own chat template).
Result: one entry per model: {"prompt_token_ids": [[...]], "token_ids": [[...]]}, in
prompt order; a prompt with "adapter" true runs with the model's LoRA adapter.

Nothing of medray is imported here: this is the outside world's reader of medray's output.
"""

import json
import sys


def data_url(path: str) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(open(path, "rb").read()).decode()


def main() -> None:
    import os

    # The engine in this process, as medray's batch engine runs it: with vLLM's default (an
    # engine-core process and, on CPU, a worker process per LLM) each model took ~17 s to
    # start and 5 s to stop here, against ~2 s in all. The model is read the same either way.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    job = json.loads(open(sys.argv[1]).read())
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"])
    results = []
    for spec in job["models"]:
        lora = spec.get("lora")
        llm = LLM(model=spec["model"], dtype="float32", enforce_eager=True, max_model_len=512,
                  limit_mm_per_prompt={"image": 1}, enable_lora=bool(lora), max_lora_rank=8, seed=0,
                  max_num_seqs=8, hf_overrides=spec.get("hf_overrides"))
        outputs = {}
        for use_adapter in (False, True):
            chosen = [(i, p) for i, p in enumerate(spec["prompts"]) if bool(p.get("adapter")) == use_adapter]
            if not chosen:
                continue
            conversations = [[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url(p["image"])}},
                {"type": "text", "text": p["question"]}]}] for _, p in chosen]
            done = llm.chat(conversations, params, use_tqdm=False,
                            lora_request=LoRARequest("adapter", 1, lora) if use_adapter else None)
            outputs.update({i: o for (i, _), o in zip(chosen, done)})
        outputs = [outputs[i] for i in range(len(spec["prompts"]))]
        results.append({"prompt_token_ids": [list(o.prompt_token_ids) for o in outputs],
                        "token_ids": [list(o.outputs[0].token_ids) for o in outputs]})
        del llm
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":  # vLLM's engine starts worker processes with spawn
    main()
