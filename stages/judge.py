"""DVC entry point of stage ``judge``: its paths from ``dvc.yaml``, its params sections, then ``politune.judge.run``."""

from politune import judge
from politune.common import run_main, stage_main, stage_parser

SECTIONS = ("base", "judge")


def main(argv=None) -> None:
    parser = stage_parser(judge.__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="target (base) model directory")
    parser.add_argument("--sft", required=True, help="SFT adapter directory")
    parser.add_argument("--dpo", required=True, help="DPO adapter directory")
    parser.add_argument("--judge-model", required=True, help="model a local `vllm serve` runs as the judge")
    parser.add_argument("--metrics", required=True, help="scores per model (JSON)")
    parser.add_argument("--answers", required=True, help="every answer and its score (CSV)")
    stage_main(parser, SECTIONS, judge.run, argv)


if __name__ == "__main__":
    run_main(main)
