"""DVC entry point of stage ``build_datasets``: its paths from ``dvc.yaml``, its params sections, then ``politune.build_datasets.run``."""

from politune import build_datasets
from politune.common import run_main, stage_main, stage_parser

SECTIONS = ("ideology", "base", "datasets")


def main(argv=None) -> None:
    parser = stage_parser(build_datasets.__doc__.splitlines()[0])
    parser.add_argument("--annotated", required=True, help="the generate stage's output (source 'annotated')")
    parser.add_argument("--external", required=True, help="folder of user-provided preference datasets")
    parser.add_argument("--sft-out", required=True)
    parser.add_argument("--dpo-out", required=True)
    parser.add_argument("--report", required=True)
    stage_main(parser, SECTIONS, build_datasets.run, argv)


if __name__ == "__main__":
    run_main(main)
