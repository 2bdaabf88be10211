"""DVC entry point of stage ``dpo``: its paths from ``dvc.yaml``, its params sections, then ``politune.dpo.run``."""

from politune import dpo
from politune.common import run_main, stage_main
from politune.training import training_parser

SECTIONS = ("base", "launch", "recipe", "lora", "dpo", "kto", "orpo", "cpo")


def main(argv=None) -> None:
    parser = training_parser(dpo.__doc__.splitlines()[0], adapter=True)
    parser.add_argument("--trajectory", help="folder for adapter snapshots at every checkpoint (step-N)")
    stage_main(parser, SECTIONS, dpo.run, argv)


if __name__ == "__main__":
    run_main(main)
