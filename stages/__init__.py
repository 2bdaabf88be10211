"""DVC entry points, one per stage of dvc.yaml: each parses its paths and params, then calls ``politune``."""
