"""Entrypoint for `ray job submit --working-dir . -- python jobs/infer.py --model ... --input ... --output ...`."""

import argparse
import logging
import sys

from medray.infer import add_infer_arguments, infer_config_from_args, run_inference


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_infer_arguments(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.info(run_inference(infer_config_from_args(args)).line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
