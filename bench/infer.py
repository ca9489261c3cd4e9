"""Batch-inference benchmarks, run by hand: `python bench/infer.py [--images N]`.

On the same model and images, measured in this run:
1. the Ray Data pipeline against a LLaVA-Med model_vqa.py-style loop (one image at a time,
   batch 1). Target: >= 8x;
2. the Ray Data pipeline against a bare in-process batched loop (same batch size).
   Target: <= 10 % overhead;
3. with a GPU: images/s of a 7B-size LLaVA with random weights (576 image tokens, 64 new
   tokens). Target: >= 40 images/s per H100.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from medray import storage
from medray.data import load_image
from medray.data.synthetic import write_synthetic
from medray.infer import GenerationEngine, GenerationSettings, Request
from medray.infer import InferConfig, run_inference
from medray.models import load_model

QUESTION = "Is there an opacity?"


def messages():
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]


def one_at_a_time(engine, uris, settings) -> float:
    """model_vqa.py's shape: for each question, read the image, build the prompt, generate."""
    t0 = time.perf_counter()
    for uri in uris:
        image = load_image(storage.read_bytes(uri), uri)
        engine.generate([Request(messages(), [image])], settings)
    return len(uris) / (time.perf_counter() - t0)


def batched(engine, uris, settings, batch_size) -> float:
    t0 = time.perf_counter()
    for start in range(0, len(uris), batch_size):
        chunk = uris[start: start + batch_size]
        images = [load_image(storage.read_bytes(u), u) for u in chunk]
        engine.generate([Request(messages(), [img]) for img in images], settings)
    return len(uris) / (time.perf_counter() - t0)


def pipeline(model, images_dir, out, new_tokens, batch_size, cpus_per_actor):
    cfg = InferConfig(model=model, input=images_dir, output=out, task="vqa", question=QUESTION,
                      max_new_tokens=new_tokens, batch_size=batch_size, rows_per_shard=batch_size,
                      cpus_per_actor=cpus_per_actor)
    return run_inference(cfg, progress=False)


def gpu_images_per_s(new_tokens: int = 64, batch_size: int = 64) -> None:
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, MistralConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    text = MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=32064, max_position_embeddings=4096)
    with torch.device("cuda"):
        model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                          image_token_index=32000)).to(torch.bfloat16).eval()
    ids = torch.randint(0, 32000, (batch_size, 576 + 32), device="cuda")
    ids[:, :576] = 32000
    pixels = torch.randn(batch_size, 3, 336, 336, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False)
        torch.cuda.synchronize()
    print(f"7B LLaVA bf16, batch {batch_size}, 576 image + 32 text tokens, {new_tokens} new tokens: "
          f"{batch_size / (time.perf_counter() - t0):.1f} images/s (target >= 40 per H100)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model", default="tiny://llava-mistral")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    args = parser.parse_args()
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    settings = GenerationSettings(max_new_tokens=args.new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic("chest-vqa", os.path.join(tmp, "c"), n=args.images, seed=0)
        images_dir = os.path.join(tmp, "c", "images")
        uris = [f.uri for f in storage.list_files(images_dir)]
        engine = GenerationEngine(load_model(args.model))
        engine.generate([Request(messages(), [load_image(storage.read_bytes(uris[0]), uris[0])])], settings)
        single = one_at_a_time(engine, uris, settings)
        bare = batched(engine, uris, settings, args.batch_size)
        del engine
        # A first pass warms Ray's worker processes (imports, model cache); the second is measured.
        pipeline(args.model, images_dir, os.path.join(tmp, "warm"), args.new_tokens, args.batch_size,
                 args.cpus_per_actor)
        summary = pipeline(args.model, images_dir, os.path.join(tmp, "out"), args.new_tokens, args.batch_size,
                           args.cpus_per_actor)
    whole, steady = summary.rows_per_s, summary.steady_rows_per_s
    print(f"{args.images} images, {args.new_tokens} new tokens, batch {args.batch_size}, model {args.model}")
    print(f"one at a time (model_vqa.py style): {single:.1f} images/s")
    print(f"bare batched loop:                  {bare:.1f} images/s")
    print(f"Ray Data pipeline: {whole:.1f} images/s end to end ({summary.first_rows_s:.1f} s start-up), "
          f"{steady:.1f} images/s after the first shard")
    print(f"pipeline / one-at-a-time = {whole / single:.2f}x end to end, {steady / single:.2f}x steady (target >= 8x)")
    print(f"bare / pipeline (steady) = {bare / steady:.3f} (overhead {100 * (bare / steady - 1):+.1f} %, "
          f"target <= 10 %)")
    if torch.cuda.is_available():
        gpu_images_per_s()
    else:
        print("no GPU here: skipped the 7B images/s measurement")


if __name__ == "__main__":
    main()
