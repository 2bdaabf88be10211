"""DVC entry point of stage ``ingest``: its paths from ``dvc.yaml``, its params sections, then ``politune.ingest.run``."""

from politune import ingest
from politune.common import run_main, stage_main, stage_parser

SECTIONS = ("ingest",)


def main(argv=None) -> None:
    parser = stage_parser(ingest.__doc__.splitlines()[0])
    parser.add_argument("--raw", required=True, help="folder of raw post files")
    parser.add_argument("--out", required=True, help="output Parquet table")
    parser.add_argument("--report", required=True, help="ingest report (JSON)")
    stage_main(parser, SECTIONS, ingest.run, argv)


if __name__ == "__main__":
    run_main(main)
