"""The peer a user would pick instead of medray's pipeline: vLLM's own `LLM.chat` over a folder
of images, as its docs show it. Run in the vLLM environment (.venv-vllm), by bench/scale.py:

    python bench/_vllm_peer.py job.json

job.json: {"model": dir, "images": [png paths], "question": text, "max_tokens": N,
           "max_num_seqs": N, "max_model_len": N, "kv_cache_bytes": N, "repeat": N}
Prints one line, "RESULT {json}": images/s of each repeat (the images read and decoded, the
prompts rendered by vLLM with the model's chat template, every answer generated), the mean
new tokens per answer, and the engine's start-up seconds. Threads: OMP_NUM_THREADS, set by the caller to what medray's
generation actor gets. Nothing of medray is imported here.
"""

import json
import os
import sys
import time


def main() -> None:
    # The engine in this process, as medray's batch actor runs it (its one-GPU layout).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    job = json.loads(open(sys.argv[1]).read())
    from PIL import Image
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=job["model"], dtype="float32", enforce_eager=True, max_model_len=job["max_model_len"],
              max_num_seqs=job["max_num_seqs"], limit_mm_per_prompt={"image": 1}, seed=0,
              kv_cache_memory_bytes=job["kv_cache_bytes"], distributed_executor_backend="uni")
    start_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"])
    warm = [[{"role": "user", "content": [{"type": "image_pil", "image_pil": Image.open(job["images"][0]).convert("RGB")},
                                          {"type": "text", "text": job["question"]}]}]]
    llm.chat(warm, params, use_tqdm=False)
    rates, tokens = [], []
    for _ in range(job["repeat"]):
        t0 = time.perf_counter()
        conversations = [[{"role": "user", "content": [
            {"type": "image_pil", "image_pil": Image.open(p).convert("RGB")},
            {"type": "text", "text": job["question"]}]}] for p in job["images"]]
        outputs = llm.chat(conversations, params, use_tqdm=False)
        assert len(outputs) == len(job["images"])
        rates.append(len(outputs) / (time.perf_counter() - t0))
        tokens.append(sum(len(o.outputs[0].token_ids) for o in outputs) / len(outputs))
    print("RESULT " + json.dumps({"images_per_s": rates, "tokens_per_answer": tokens, "start_s": start_s}))


if __name__ == "__main__":
    main()
