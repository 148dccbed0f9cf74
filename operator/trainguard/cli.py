"""``trainguard-operator``: runs the operator (a thin wrapper over ``kopf run -m trainguard.handlers``)."""

from __future__ import annotations

import os
import sys

from trainguard.domain.config import ConfigError, config_from_env

USAGE = """usage: trainguard-operator run [kopf run options...]

Runs the trainguard operator. Configuration comes from TRAINGUARD_* environment variables
(see README.md); extra options are passed to `kopf run` (e.g. --liveness, --verbose).
"""


def kopf_arguments(argv: list[str], env: dict[str, str]) -> list[str]:
    """The `kopf run` command line for these arguments and this environment."""
    config = config_from_env(env)
    args = ['run', '-m', 'trainguard.handlers']
    if config.namespaces:
        args += [f'--namespace={namespace}' for namespace in config.namespaces]
    else:
        args.append('--all-namespaces')
    if config.log_format == 'json':
        args.append('--log-format=json')
    return args + argv


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] != 'run':
        print(f'unknown command {argv[0]!r}\n\n{USAGE}', file=sys.stderr)
        return 2
    try:
        args = kopf_arguments(argv[1:], dict(os.environ))
    except ConfigError as error:
        print(f'trainguard-operator: {error}', file=sys.stderr)
        return 2
    from kopf.cli import main as kopf_main  # imported late: --help needs no kopf start-up

    return kopf_main(args=args, standalone_mode=False) or 0


if __name__ == '__main__':
    sys.exit(main())
