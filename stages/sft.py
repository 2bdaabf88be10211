"""DVC entry point of stage ``sft``: its paths from ``dvc.yaml``, its params sections, then ``politune.sft.run``."""

from politune import sft
from politune.common import run_main, stage_main
from politune.training import training_parser

SECTIONS = ("base", "launch", "lora", "sft")


def main(argv=None) -> None:
    parser = training_parser(sft.__doc__.splitlines()[0])
    stage_main(parser, SECTIONS, sft.run, argv)


if __name__ == "__main__":
    run_main(main)
