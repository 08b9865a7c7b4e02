"""The ``kvpolicy`` command line. Each sub-command lives in its own module with
``add_arguments(parser)`` and ``run(args) -> int``; modules are imported only when used."""

from __future__ import annotations

import argparse
import importlib
import sys

from kvpolicy.errors import KVPolicyError

#: sub-command → (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "plugins": ("kvpolicy.cli.plugins", "list loaded plugins, their distributions and components"),
    "run": ("kvpolicy.cli.run", "generate with a policy on a real shipped model and report the cache kept"),
    "eval": ("kvpolicy.cli.eval", "score a policy on the offline long-context suite"),
    "compare": ("kvpolicy.cli.compare", "compare policies at matched cache size: table and plot"),
    "evolve": ("kvpolicy.cli.evolve", "evolve a NAMM scorer with CMA-ES (resumable)"),
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvpolicy", description="Composable KV-cache eviction policies.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def _check_native_mode() -> None:
    """A wrong ``KVPOLICY_NATIVE``, or kernels that ``require`` cannot build, fail before any model loads."""
    from kvpolicy import native

    if native.mode() == "require":
        native.available()


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        _check_native_mode()
        return int(args._run(args) or 0)
    except KVPolicyError as exc:
        print(f"kvpolicy: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
