"""Entrypoint for `ray job submit --working-dir . -- python jobs/infer.py --model ... --input ... --output ...`."""

import argparse
import logging
import sys

from medray.infer import add_infer_arguments, infer_config_from_args, run_inference
from medray.localray import Stopped
from medray.quiet import quiet_noise


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_infer_arguments(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_noise()
    logging.info(run_inference(infer_config_from_args(args)).line())
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Stopped:  # `ray job stop` sends SIGTERM: the run is not done, and that is all to say
        sys.exit(143)
