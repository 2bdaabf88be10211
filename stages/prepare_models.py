"""DVC entry point of stage ``prepare_models``: its paths from ``dvc.yaml``, its params sections, then ``politune.prepare_models.run``."""

from politune import prepare_models
from politune.common import run_main, stage_main, stage_parser

SECTIONS = ("models",)


def main(argv=None) -> None:
    parser = stage_parser(prepare_models.__doc__.splitlines()[0])
    parser.add_argument("--annotator-out", required=True)
    parser.add_argument("--target-out", required=True)
    parser.add_argument("--report", required=True)
    stage_main(parser, SECTIONS, prepare_models.run, argv)


if __name__ == "__main__":
    run_main(main)
