"""Entrypoint for `ray job submit --working-dir . -- python jobs/infer.py --model ... --input ... --output ...`."""

import argparse
import logging
import sys

from medray.cli import add_infer_arguments
from medray.infer.pipeline import InferConfig, run_inference


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_infer_arguments(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = InferConfig.model_validate({k: v for k, v in vars(args).items() if v is not None})
    logging.info(run_inference(cfg).line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
