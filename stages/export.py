"""DVC entry point of stage ``export``: its paths from ``dvc.yaml``, its params sections, then ``politune.export.run``."""

from politune import export
from politune.common import run_main, stage_main, stage_parser

SECTIONS = ("ideology", "datasets", "recipe", "lora", "sft", "dpo", "kto", "orpo", "cpo", "export")


def main(argv=None) -> None:
    parser = stage_parser(export.__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the target model folder")
    parser.add_argument("--adapter", required=True, help="the DPO adapter folder")
    parser.add_argument("--out", required=True, help="the merged model folder to write")
    parser.add_argument("--report", required=True, help="the export check's figures (JSON)")
    parser.add_argument("--models", help="prepare_models' report, quoted in the model card")
    parser.add_argument("--datasets", help="build_datasets' report, quoted in the model card")
    parser.add_argument("--metrics", help="evaluate's metrics, quoted in the model card")
    parser.add_argument("--judge", help="judge's metrics, quoted in the model card")
    stage_main(parser, SECTIONS, export.run, argv)


if __name__ == "__main__":
    run_main(main)
