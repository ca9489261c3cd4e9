"""The `medray` command. Each subcommand parses its flags and calls into the library."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _tiny_model(args) -> int:
    from medray.models import write_tiny_model

    out = write_tiny_model(args.family, args.out, seed=args.seed, chat_template=args.chat_template)
    print(out)
    return 0


def _convert_llava(args) -> int:
    from medray.models.convert import convert_llava

    print(convert_llava(args.src, args.out, vision_tower=args.vision_tower,
                        chat_template=args.chat_template, allow_pickle=args.allow_pickle))
    return 0


def _apply_delta(args) -> int:
    import tempfile

    from medray.models.convert import apply_delta, convert_llava

    if not args.to_hf:
        print(apply_delta(args.base, args.delta, args.out, allow_pickle=args.allow_pickle))
        return 0
    with tempfile.TemporaryDirectory(prefix="medray-delta-") as tmp:
        merged = apply_delta(args.base, args.delta, tmp, allow_pickle=args.allow_pickle)
        print(convert_llava(merged, args.out, vision_tower=args.vision_tower, allow_pickle=args.allow_pickle))
    return 0


def _ask(args) -> int:
    from medray.config import values_from_args
    from medray.infer import GenerationSettings, ask

    answer = ask(args.model, args.question, image=args.image, adapter=args.adapter,
                 settings=GenerationSettings(**values_from_args(GenerationSettings, args)),
                 trust_remote_code=args.trust_remote_code)
    print(json.dumps({"model": args.model, "question": args.question, "answer": answer.text,
                      "completion_tokens": answer.completion_tokens}))
    return 0


_ADDRESS_HELP = ("the Ray cluster's GCS address HEAD:6379 (default: RAY_ADDRESS, else a private local Ray; "
                 "never a cluster merely running on this machine)")


def _connect(args, **init_kwargs) -> None:
    from medray.raycluster import connect

    connect(args.address, **init_kwargs)


def _train(args) -> int:
    from medray.config import values_from_args
    from medray.train import TrainArgs, load_manifest, run_curriculum

    train = TrainArgs.model_validate(values_from_args(TrainArgs, args))
    _connect(args, log_to_driver=True)
    results = run_curriculum(load_manifest(train.manifest, train.set))
    for r in results:
        state = "skipped (done)" if r.skipped else f"trained in {r.seconds:.0f} s"
        loss = r.metrics.get("loss")
        print(f"{r.name:<16} {state:<20} loss {loss if loss is None else round(loss, 4)}  ->  {r.model}")
    return 0


def _infer(args) -> int:
    from medray.infer import infer_config_from_args, run_inference

    cfg = infer_config_from_args(args)
    _connect(args, log_to_driver=False)
    print(run_inference(cfg).line())
    return 0


def _eval(args) -> int:
    from medray.eval import evaluate, write_report

    report = evaluate(args.predictions, args.references, candidates=args.candidates)
    if args.out:
        for uri in write_report(report, args.out):
            print(uri)
    print(json.dumps(report, indent=2))
    return 0


def _serve(args) -> int:
    from medray.serve.run import run_config

    run_config(args.config, address=args.address)
    return 0


def _key_digest(args) -> int:
    from medray.serve.config import key_digest

    keys = [line.strip() for line in sys.stdin if line.strip()]
    if not keys:
        raise ValueError("give the keys on standard input, one per line")
    for key in keys:
        print(key_digest(key))
    return 0


def _show(args) -> int:
    from medray.lineage import lineage, render_tree

    tree = lineage(args.uri)
    if not tree.get("kind"):
        raise FileNotFoundError(f"no medray provenance at {args.uri} (a stage directory, a batch-inference "
                                "output or an eval report holds one)")
    print(json.dumps(tree, indent=2) if args.json else "\n".join(render_tree(tree)))
    return 0


def _report(args) -> int:
    from medray.report import write_html_report

    print(write_html_report(args.uri, args.out, args.samples))
    return 0


def _demo(args) -> int:
    from medray.demo import DemoFailed, DemoOptions, run_demo

    opts = DemoOptions(workdir=args.workdir, results=args.results, model=args.model, corpus=args.corpus,
                       address=args.address,
                       s3_endpoint=args.s3_endpoint, local_files=args.local_files,
                       instruct_steps=args.instruct_steps, min_gain=args.min_gain)
    try:
        print(run_demo(opts))
    except DemoFailed as e:
        print(e, file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    from medray.models import FAMILIES, TEMPLATES

    p = argparse.ArgumentParser(prog="medray", description=(
        "Fine-tune, batch-run and serve medical vision-language models on Ray. "
        "Model URIs: a local HF directory, s3://bucket/prefix, or tiny://FAMILY[?seed=N]."))
    p.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("tiny-model", help="write a tiny random-init HF model directory (offline)",
                       description="Write a tiny random-init model, with its tokenizer and processor, "
                                   "as a normal HF directory. Families: " +
                                   "; ".join(f"{f.name} ({f.seeds})" for f in FAMILIES.values()))
    t.add_argument("--family", required=True, choices=sorted(FAMILIES))
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--seed", type=int, default=0, help="weights and tokenizer are a function of this")
    t.add_argument("--chat-template", choices=sorted(TEMPLATES), default=None,
                   help="override the family's default prompt format")
    t.set_defaults(func=_tiny_model)

    c = sub.add_parser("convert", help="convert checkpoints into HF directories",
                       description="Convert checkpoints published in LLaVA's own format.")
    csub = c.add_subparsers(dest="convert_command", required=True, metavar="KIND")
    cl = csub.add_parser("llava", help="LLaVA-format checkpoint (llava / llava_llama / llava_mistral) -> HF Llava",
                         description="Turn a LLaVA-format checkpoint (LLaVA-Med v1.5, e.g. "
                                     "llava-med-v1.5-mistral-7b, or LLaVA-Med v1) into an HF "
                                     "LlavaForConditionalGeneration directory that sees, tokenizes and "
                                     "answers as the original does, or refuse naming the field it cannot honour.")
    cl.add_argument("src", help="source directory (local or s3://)")
    cl.add_argument("out", help="output directory")
    cl.add_argument("--vision-tower", help="HF CLIP directory, when the checkpoint does not hold the "
                                           "tower or names one medray does not know")
    cl.add_argument("--chat-template", choices=sorted(TEMPLATES),
                    help="prompt format (default: mistral_instruct for llava_mistral, vicuna_v1 for llava_llama, "
                         "llava_med_v1 for LLaVA-Med v1)")
    cl.add_argument("--allow-pickle", action="store_true",
                    help="also read pytorch_model*.bin (weights-only unpickler); output is safetensors")
    cl.set_defaults(func=_convert_llava)
    cd = csub.add_parser("apply-delta", help="apply LLaVA-Med v1 delta weights to a base LLaMA",
                         description="target = base + delta, LLaVA-Med v1's release scheme. Writes "
                                     "LLaVA's format, or an HF directory with --to-hf.")
    cd.add_argument("--base", required=True, help="base LLaMA HF directory (local or s3://)")
    cd.add_argument("--delta", required=True, help="delta checkpoint directory (local or s3://)")
    cd.add_argument("out", help="output directory")
    cd.add_argument("--to-hf", action="store_true", help="convert the result into an HF Llava directory")
    cd.add_argument("--vision-tower", help="with --to-hf: HF CLIP directory for the tower")
    cd.add_argument("--allow-pickle", action="store_true", help="also read pytorch_model*.bin")
    cd.set_defaults(func=_apply_delta)

    a = sub.add_parser("ask", help="ask a model one question, optionally about one image",
                       description="Load a model URI and answer one question; prints JSON.")
    a.add_argument("--model", required=True, help="model URI")
    a.add_argument("--adapter", help="PEFT adapter directory (local or s3://)")
    a.add_argument("--image", help="image URI (PNG, JPEG, TIFF or DICOM; local or s3://)")
    a.add_argument("--question", required=True)
    from medray.config import add_arguments
    from medray.engines.types import GenerationSettings

    add_arguments(a, GenerationSettings)  # --max-new-tokens, --temperature, ...: the settings' own
    a.add_argument("--trust-remote-code", action="store_true",
                   help="run Python code shipped with the model (off by default)")
    a.set_defaults(func=_ask)

    tr = sub.add_parser("train", help="run a curriculum manifest on Ray Train",
                        description="Run each stage of a curriculum manifest with Ray Train, on the Ray "
                                    "cluster at --address or RAY_ADDRESS, else on a private local one. "
                                    "Finished stages are skipped; interrupted ones resume.")
    from medray.train.config import TrainArgs

    add_arguments(tr, TrainArgs, positional=("manifest",))
    tr.add_argument("--address", help=_ADDRESS_HELP)
    tr.set_defaults(func=_train)

    inf = sub.add_parser("infer", help="batch captioning / VQA over an image corpus on Ray Data",
                         description="Caption or question every image under a prefix (or every row of a "
                                     "manifest) and write Parquet/JSONL shards to an output prefix. "
                                     "Reruns process only the rows not yet written.")
    from medray.infer import add_infer_arguments

    add_infer_arguments(inf)
    inf.add_argument("--address", help=_ADDRESS_HELP)
    inf.set_defaults(func=_infer)

    ev = sub.add_parser("eval", help="score predictions against references (VQA, MCQA)",
                        description="LLaVA-Med's VQA metrics as its run_eval.py computes them, a corrected "
                                    "token-level variant beside them, and multiple-choice accuracy.")
    ev.add_argument("--predictions", required=True,
                    help="medray infer output prefix, or a JSON/JSONL/Parquet answer file (id|question_id, answer|text)")
    ev.add_argument("--references", required=True, help="VQA or MCQA records (e.g. VQA-RAD test.json)")
    ev.add_argument("--candidates", help="LLaVA-Med's candidate answer file, for its open accuracy")
    ev.add_argument("--out", help="directory or s3:// prefix for report.json and the charts")
    ev.set_defaults(func=_eval)

    sv = sub.add_parser("serve", help="run a Serve config (the same YAML `serve run` takes)",
                        description="Start Ray Serve with the applications of a Serve config file and block. "
                                    "API keys come from the config's api_keys and from MEDRAY_API_KEYS, "
                                    "which this command passes on to the cluster as digests.")
    sv.add_argument("config", help="Serve config YAML, e.g. manifests/serve/tiny.yaml")
    sv.add_argument("--address", help=_ADDRESS_HELP)
    sv.set_defaults(func=_serve)

    kd = sub.add_parser("key-digest", help="print the sha256: digest of API keys read from standard input",
                        description="Print `sha256:<hex>` for each key on standard input (one per line), "
                                    "the form api_keys in a Serve config takes without holding a secret. "
                                    "Example: printf %%s \"$MEDRAY_API_KEY\" | medray key-digest")
    kd.set_defaults(func=_key_digest)

    sh = sub.add_parser("show", help="print what made an artifact: its inputs, their digests, and theirs",
                        description="Print the lineage of a curriculum stage directory (or any medray "
                                    "artifact with a provenance record), local or s3://: each input with its "
                                    "content digest, followed down through the artifacts medray made.")
    sh.add_argument("uri", help="e.g. out/run/instruct or s3://bucket/run/instruct")
    sh.add_argument("--json", action="store_true", help="the tree as JSON")
    sh.set_defaults(func=_show)

    rp = sub.add_parser("report", help="a run (curriculum stages, answers, evals) as one self-contained HTML page",
                        description="Gather the stages and eval reports under URI (local or s3://) into one HTML "
                                    "page: loss and learning-rate curves of every stage, accuracy per answer type "
                                    "before and after training, sample images with the question, the reference "
                                    "and each model's answer, and the provenance tree. Prints where it wrote it.")
    rp.add_argument("uri", help="a run's root, e.g. medray-demo or s3://bucket/runs/llava-med")
    rp.add_argument("--out", help="the HTML file to write (local or s3://); default: URI/report.html")
    rp.add_argument("--samples", type=int, default=12, help="sample images to show")
    rp.set_defaults(func=_report)

    d = sub.add_parser("demo", help="run the main job on an embedded default (local Ray, local S3, tiny model)",
                       description="On a local Ray and a loopback S3 endpoint: synthesize a labelled radiology "
                                   "corpus, train a tiny LLaVA through a two-stage curriculum (Ray Train), run "
                                   "batch VQA before and after (Ray Data), evaluate both, and answer one request "
                                   "through the Serve API. Fails unless training improved accuracy.")
    d.add_argument("--workdir", default="out/demo", help="where local working files go (cache; the store "
                                                            "with --local-files)")
    d.add_argument("--results", default="medray-demo",
                   help="where the run is copied when it ends: corpus, stages, answers, eval, report.html")
    d.add_argument("--model", default="tiny://llava-mistral", help="base model URI (directory, s3://, tiny://)")
    d.add_argument("--corpus", help="prefix with align/, instruct/ and test/ records.jsonl (synthesized if absent)")
    d.add_argument("--address", help=_ADDRESS_HELP + "; the cluster must reach the same S3 store")
    d.add_argument("--s3-endpoint", help="use this S3 endpoint (AWS_* credentials from the environment) "
                                         "instead of starting a local one")
    d.add_argument("--local-files", action="store_true", help="keep everything under WORKDIR/store, no S3")
    d.add_argument("--instruct-steps", type=int, default=400, help="instruction-tuning steps")
    d.add_argument("--min-gain", type=float, default=0.3, help="accuracy gain training must reach")
    d.set_defaults(func=_demo)
    return p


RAY_COMMANDS = ("train", "infer", "serve", "demo")
"""The commands that run Ray (their output has Ray's noise kept out: quiet.quiet_noise)."""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # each S3 client's "Found credentials", each HTTP call: -v shows them
        for name in ("botocore", "boto3", "httpx"):
            logging.getLogger(name).setLevel(logging.WARNING)
    from medray.localray import Stopped
    from medray.quiet import quiet_noise

    if args.command in RAY_COMMANDS:
        quiet_noise()
    try:
        return args.func(args)
    except Stopped:  # SIGTERM: the local Ray's processes end at exit (localray.LocalProcesses)
        # For `medray serve` a stop is how it ends, not a failure (systemd and Kubernetes
        # count 0 as a clean stop); a run cut short is not done: 128 + SIGTERM.
        return 0 if args.command == "serve" else 143
    except KeyboardInterrupt:  # Ctrl-C is how `medray serve` is stopped: no traceback for it
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        # Errors the user can act on get one clear line, not a traceback.
        print(f"medray: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
