"""DVC entry point of stage ``evaluate``: its paths from ``dvc.yaml``, its params sections, then ``politune.evaluate.run``."""

from politune import evaluate
from politune.common import run_main, stage_main, stage_parser

SECTIONS = ("base", "evaluate")


def main(argv=None) -> None:
    parser = stage_parser(evaluate.__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="target (base) model directory")
    parser.add_argument("--compass", required=True, help="propositions and weights (JSON)")
    parser.add_argument("--sft", required=True, help="SFT adapter directory")
    parser.add_argument("--dpo", required=True, help="DPO adapter directory")
    parser.add_argument("--metrics", required=True)
    parser.add_argument("--plot", required=True, help="compass PNG")
    parser.add_argument("--points", required=True, help="compass points (DVC plot data)")
    parser.add_argument("--answers", required=True, help="per-proposition answer table (CSV)")
    parser.add_argument("--trajectory", help="DPO adapter snapshots (step-N folders) to evaluate along the way")
    parser.add_argument("--trajectory-out", help="compass coordinates per DPO step (DVC plot data)")
    parser.add_argument("--twins", help="reversed twins of the propositions (JSON), for evaluate.balanced")
    parser.add_argument("--twin-answers", help="per-twin answer table (CSV), with --twins")
    parser.add_argument("--pairs", help="DPO dataset folder: its test split's pairs join the side preference")
    parser.add_argument("--side-table", help="per-pair side preference of each model (CSV)")
    parser.add_argument("--side-plot", help="side-preference shifts per model and data side (DVC plot data)")
    stage_main(parser, SECTIONS, evaluate.run, argv)


if __name__ == "__main__":
    run_main(main)
