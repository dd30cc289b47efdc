"""The `splitserve` command line.

Each subcommand lives in the package that owns it; a module listed here exposes
`add_arguments(parser)` and `run(args) -> int`. Modules are imported only when their
subcommand runs, so `splitserve --help` stays fast and a broken optional piece cannot
take the whole command down.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("cluster.run_command", "start the pools and drive a workload through them"),
    "generate": ("cluster.generate_command", "print one completion from a cluster config"),
    "codec-eval": ("kvtransfer.codec.evaluate", "measure KV codec quality per level on a real model"),
    "profile": ("planner.profile_command", "profile the engine on the hardware at hand"),
    "plan": ("planner.plan_command", "pick per-phase parallelism and instance counts"),
    "sweep": ("planner.sweep_command", "run SLO sweeps on the real cluster and the simulator"),
    "serve": ("cluster.serve_command", "OpenAI-compatible HTTP server on Ray Serve"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="splitserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] not in COMMANDS:
        parser.error(f"unknown command {argv[0]!r}; choose one of: {', '.join(COMMANDS)}")
    name = argv[0]
    module_name, help_text = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            print(f"splitserve {name}: not available in this build ({exc.name} missing)", file=sys.stderr)
            return 2
        raise
    cmd_parser = argparse.ArgumentParser(prog=f"splitserve {name}", description=help_text)
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(argv[1:])
    return int(module.run(args) or 0)
