"""Entrypoint for `ray job submit --working-dir . -- python jobs/train.py MANIFEST [--set k=v ...]`."""

import argparse
import logging
import sys

from medray.config import add_arguments, values_from_args
from medray.localray import Stopped
from medray.quiet import quiet_noise
from medray.train import TrainArgs, load_manifest, run_curriculum


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser, TrainArgs, positional=("manifest",))
    args = TrainArgs.model_validate(values_from_args(TrainArgs, parser.parse_args()))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_noise()
    for result in run_curriculum(load_manifest(args.manifest, args.set)):
        logging.info("stage %s: %s -> %s", result.name, "skipped" if result.skipped else "trained", result.model)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Stopped:  # `ray job stop` sends SIGTERM: the run is not done, and that is all to say
        sys.exit(143)
