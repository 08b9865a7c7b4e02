"""``kvpolicy plugins``: every loaded plugin, its distribution, version and components.

It must work when other commands cannot: plugins are loaded non-strictly here, so a broken
plugin or two plugins registering the same name are listed as problems instead of ending the
command (the names in conflict are marked with ``!``).
"""

from __future__ import annotations

import argparse
import json
import warnings

from kvpolicy.registry import Registry


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registry = Registry(strict=False)
    problems = list(dict.fromkeys(str(w.message) for w in caught))
    infos = registry.plugins()
    conflicts = registry.conflicts()
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "name": p.name,
                        "distribution": p.distribution,
                        "version": p.version,
                        "module": p.module,
                        "components": list(p.components),
                        "conflicts": list(p.conflicts),
                    }
                    for p in infos
                ],
                indent=2,
            )
        )
        return 0
    for info in infos:
        origin = f"{info.distribution} {info.version}" if info.distribution else "registered in code"
        print(f"{info.name}  ({origin})" + (f"  module {info.module}" if info.module else ""))
        for component in sorted({*info.components, *info.conflicts}):
            mark = "  ! conflict" if component in info.conflicts else ""
            print(f"    {component}{mark}")
    presets = registry.preset_names()
    print(f"\n{len(infos)} plugins; policy presets: {', '.join(presets) or 'none'}")
    for conflict in conflicts:
        kind = "policy" if conflict.kind == "policy preset" else conflict.kind
        print(
            f"conflict: {kind} {conflict.name!r} is registered by {', '.join(conflict.providers)}; "
            "it cannot be used until one of them is uninstalled"
        )
    for problem in problems:
        print(f"problem: {problem}")
    return 0
