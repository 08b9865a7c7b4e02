"""``kvpolicy plugins``: every loaded plugin, its distribution, version and components."""

from __future__ import annotations

import argparse
import json

from kvpolicy.registry import default_registry


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    registry = default_registry()
    infos = registry.plugins()
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "name": p.name,
                        "distribution": p.distribution,
                        "version": p.version,
                        "components": list(p.components),
                    }
                    for p in infos
                ],
                indent=2,
            )
        )
        return 0
    for info in infos:
        origin = f"{info.distribution} {info.version}" if info.distribution else "registered in code"
        print(f"{info.name}  ({origin})")
        for component in info.components:
            print(f"    {component}")
    presets = registry.preset_names()
    print(f"\n{len(infos)} plugins; policy presets: {', '.join(presets) or 'none'}")
    return 0
