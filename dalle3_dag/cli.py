"""`dalle3`: the project's command line, for what is not a Dagster materialization."""

import argparse
import sys

from dalle3_dag.resources import DvcResource, MlflowResource, StorageResource


def summary(_: argparse.Namespace) -> int:
    """Print what has been materialized, where it lives, and how to look at it."""
    from dalle3_dag.definitions import defs

    storage, dvc = StorageResource(), DvcResource()
    print(f"{'asset':24} {'group':10} {'dvc hash':38} path")
    for spec in sorted(defs.resolve_all_asset_specs(), key=lambda s: s.key.to_user_string()):
        key = spec.key.to_user_string()
        path = storage.asset_dir(key)
        shown = str(path) if path.exists() else "(not materialized)"
        print(f"{key:24} {spec.group_name or '':10} {dvc.out_hash(key) or '-':38} {shown}")
    print(f"\nMLflow tracking: {MlflowResource().resolved_uri()}")
    print("UIs: `make ui`, then Dagster at http://127.0.0.1:3000 and MLflow at http://127.0.0.1:5000")
    print("Versions: `dvc status` (should be clean), `dvc push` to send assets to the remote")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dalle3", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("summary", help=summary.__doc__).set_defaults(func=summary)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
