"""DVC entry point of stage ``annotate``: its paths from ``dvc.yaml``, its params sections, then ``politune.annotate.run``."""

from politune import annotate
from politune.common import run_main, stage_main, stage_parser

SECTIONS = ("ideology", "base", "annotate")


def main(argv=None) -> None:
    parser = stage_parser(annotate.__doc__.splitlines()[0])
    parser.add_argument("--posts", required=True)
    parser.add_argument("--model", required=True, help="annotator model directory")
    parser.add_argument("--out", required=True, help="annotated table (Parquet)")
    parser.add_argument("--report", required=True)
    parser.add_argument("--sample", required=True, help="human-readable sample of kept triplets (Markdown)")
    parser.add_argument("--score-plot", help="every post's score as a DVC plot: histogram and posts kept per threshold")
    stage_main(parser, SECTIONS, annotate.run, argv)


if __name__ == "__main__":
    run_main(main)
