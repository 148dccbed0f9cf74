"""``trainguard-operator``: runs the operator (a thin wrapper over ``kopf run -m trainguard.handlers``)."""

from __future__ import annotations

import os
import sys

from trainguard.domain.config import ConfigError, config_from_env

USAGE = """usage: trainguard-operator run [kopf run options...]
       trainguard-operator sandbox [--demo] [--workdir DIR] [--port PORT]

run      Runs the trainguard operator. Configuration comes from TRAINGUARD_* environment
         variables (see README.md); extra options are passed to `kopf run`.
sandbox  A local development sandbox: an emulated API server, the operator, and trainer
         pods run as local processes. --demo applies two sample runs and exits 0 when the
         healthy one succeeded and the hung one was stopped. Not a cluster.
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
    if argv[0] == 'sandbox':
        return sandbox(argv[1:])
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


SANDBOX_MISSING = ("trainguard-operator sandbox needs the sandbox extra: pip install 'trainguard[sandbox]' "
                   "(or run `make demo` in a checkout)")


def sandbox(argv: list[str]) -> int:
    try:
        import trainguard_sandbox.app  # noqa: F401  the optional extra: kmock and friends
    except ImportError as error:
        print(f'{SANDBOX_MISSING}\n({error})', file=sys.stderr)
        return 2
    import argparse
    import asyncio
    import contextlib
    import logging
    import pathlib
    import tempfile

    parser = argparse.ArgumentParser(prog='trainguard-operator sandbox')
    parser.add_argument('--demo', action='store_true', help='apply the two demo samples and report')
    parser.add_argument('--workdir', type=pathlib.Path, default=None, help='kubeconfig, volumes and pod logs')
    parser.add_argument('--port', type=int, default=None, help='API port on 127.0.0.1 (default: any free)')
    parser.add_argument('--timeout', type=float, default=300.0, help='demo: give up after this many seconds')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    workdir = args.workdir or pathlib.Path(tempfile.mkdtemp(prefix='trainguard-sandbox-'))
    if args.demo:
        from trainguard_sandbox.demo import run_demo

        return asyncio.run(run_demo(workdir, timeout=args.timeout))

    from trainguard_sandbox.app import Sandbox

    async def serve() -> None:
        async with Sandbox(workdir, port=args.port) as running:
            print(f'sandbox API: {running.api_url}\nkubeconfig:  {running.kubeconfig}\n'
                  f'pod output:  {workdir / "pods"}\nCtrl-C stops it.', flush=True)
            await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0


if __name__ == '__main__':
    sys.exit(main())
