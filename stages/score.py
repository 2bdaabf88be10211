"""DVC entry point of stage ``score``: its paths from ``dvc.yaml``, the params it reads, then
``politune.annotate.run_score``."""

from politune import annotate
from politune.common import run_main, stage_main, stage_parser
from politune.schema import Score

# base, and the annotate keys scoring reads, one by one: not ideology, threshold, prompts or mirror (dvc.yaml)
SECTIONS = ("base", *(f"annotate.{key}" for key in Score.model_fields))


def main(argv=None) -> None:
    parser = stage_parser("Score every post for every viewpoint (stage score).")
    parser.add_argument("--posts", required=True)
    parser.add_argument("--model", required=True, help="annotator model directory")
    parser.add_argument("--out", required=True, help="every post with its scores (Parquet)")
    parser.add_argument("--report", required=True)
    parser.add_argument("--plot", required=True, help="the scores' distribution per viewpoint (a DVC plot)")
    parser.add_argument("--work", required=True, help="finished shards, kept until the stage ends (resume)")
    stage_main(parser, SECTIONS, annotate.run_score, argv)


if __name__ == "__main__":
    run_main(main)
