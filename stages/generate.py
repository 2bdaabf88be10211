"""DVC entry point of stage ``generate``: its paths from ``dvc.yaml``, the params it reads, then
``politune.annotate.run_generate``."""

from politune import annotate
from politune.common import run_main, stage_main, stage_parser
from politune.schema import Triplets

SECTIONS = ("ideology", "base", *(f"annotate.{key}" for key in Triplets.model_fields))


def main(argv=None) -> None:
    parser = stage_parser("Keep the posts scored for the ideology and write their triplets (stage generate).")
    parser.add_argument("--scores", required=True, help="every post with its scores (the score stage's Parquet)")
    parser.add_argument("--model", required=True, help="annotator model directory")
    parser.add_argument("--out", required=True, help="annotated table (Parquet)")
    parser.add_argument("--report", required=True)
    parser.add_argument("--sample", required=True, help="human-readable sample of kept triplets (Markdown)")
    parser.add_argument("--work", required=True, help="finished shards, kept until the stage ends (resume)")
    stage_main(parser, SECTIONS, annotate.run_generate, argv)


if __name__ == "__main__":
    run_main(main)
