"""Command line: every setting is a flag with a TRAINGUARD_* environment fallback.

The operator passes settings as flags; the environment fallback serves local use and the
run identity (TRAINGUARD_RUN_NAME, ...). A bad value, from either source, exits with code 2
and a message naming the flag.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import math
import os
import pathlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from trainguard_trainer.config import TrainerConfig


def _bounded_int(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'must be an integer, got {text!r}') from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f'must be between {low} and {high}, got {value}')
        return value
    return parse


def _number_above(low: float, *, inclusive: bool) -> Callable[[str], float]:
    """A float parser refusing values below ``low`` (or equal to it, unless ``inclusive``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'must be a number, got {text!r}') from None
        if not (value >= low if inclusive else value > low):
            raise argparse.ArgumentTypeError(f'must be {"at least" if inclusive else "greater than"} {low:g}, '
                                             f'got {value}')
        return value
    return parse


_positive_float = _number_above(0, inclusive=False)
_non_negative_float = _number_above(0, inclusive=True)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(',') if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f'must be comma-separated integers, got {text!r}') from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f'must be positive integers, got {text!r}')
    return values


def _float_list(count: int) -> Callable[[str], tuple[float, ...]]:
    """``count`` comma-separated finite numbers (a spacing: all positive; a window: low < high)."""
    def parse(text: str) -> tuple[float, ...]:
        try:
            values = tuple(float(part) for part in text.split(','))
        except ValueError:
            raise argparse.ArgumentTypeError(f'must be {count} comma-separated numbers, got {text!r}') from None
        if len(values) != count or not all(math.isfinite(value) for value in values):
            raise argparse.ArgumentTypeError(f'must be {count} comma-separated numbers, got {text!r}')
        if count == 3 and min(values) <= 0:
            raise argparse.ArgumentTypeError(f'a spacing must be positive, got {text!r}')
        if count == 2 and values[0] >= values[1]:
            raise argparse.ArgumentTypeError(f'the window\'s low must be below its high, got {text!r}')
        return values
    return parse


EXIT_DATASET = 3
EXIT_GPU_UNAVAILABLE = 4  # the operator maps it to Failed/GPUUnavailable (trainguard.domain.pods), no retry
EXIT_GPU_OUT_OF_MEMORY = 5  # ... to GPUOutOfMemory, retried with half the batch
EXIT_STOPPED = 6  # stopped on SIGTERM after a checkpoint (a drain, a preemption, a suspend): not a failure

# (flag, type, default, help); the environment variable is TRAINGUARD_ + the flag in upper snake case.
OPTIONS: list[tuple[str, Callable[[str], Any] | None, Any, str]] = [
    ('--device', None, 'auto', 'auto, cpu, gpu or cuda'),
    ('--batch-size', _bounded_int(1, 4096), 4, 'samples per optimizer step'),
    ('--num-workers', _bounded_int(0, 64), 0, 'DataLoader worker processes'),
    ('--epochs', _bounded_int(1, 100000), 2, 'passes over the training set'),
    ('--learning-rate', _positive_float, 0.01, 'Adam learning rate'),
    ('--resolution', _bounded_int(16, 4096), 128, 'square size images are resized to'),
    ('--crop-size', _bounded_int(16, 4096), 128, 'square random crop, <= resolution'),
    ('--channels', _int_list, '16,32,64,128,256', 'UNet channels per level'),
    ('--strides', _int_list, '2,2,2,2', 'UNet strides, one fewer than channels'),
    ('--num-res-units', _bounded_int(0, 8), 2, 'residual units per block'),
    ('--dataset', None, 'synthetic', 'synthetic or directory'),
    ('--dataset-format', None, 'folders',
     'directory datasets: folders (images/ and labels/) or decathlon (dataset.json, the MSD layout)'),
    ('--spatial-dims', _bounded_int(2, 3), 2, '2: images, 3: volumes'),
    ('--num-classes', _bounded_int(0, 32), 0,
     'labelled structures besides background; 0: as many as dataset.json names, else 1'),
    ('--spacing', _float_list(3), None, '3D files: voxel size in mm to resample to, x,y,z (default: the median)'),
    ('--intensity-range', _float_list(2), None, 'an intensity window mapped to [0, 1], low,high (e.g. CT -57,164)'),
    ('--data-path', None, 'auto', 'auto (cache on CUDA, stream on CPU), cache or stream'),
    ('--num-samples', _bounded_int(2, 100000), 64, 'synthetic pairs'),
    ('--data-dir', pathlib.Path, '/data', 'folder with images/ and labels/ (directory dataset)'),
    ('--output-dir', pathlib.Path, '/output', 'checkpoints, metrics.csv, curves.png'),
    ('--seed', _bounded_int(0, 2**31 - 1), 0, 'random seed'),
    ('--heartbeat-seconds', _non_negative_float, 10.0, 'minimum seconds between heartbeats; 0: every step'),
    ('--log-every-steps', _bounded_int(1, 1_000_000), 10, 'progress line interval in steps'),
    ('--system-log-seconds', _positive_float, 30.0, 'seconds between psutil system lines (they go on in a hang)'),
    ('--run-name', None, '', 'TrainingRun to report progress to; empty: only log'),
    ('--run-namespace', None, 'default', 'namespace of that TrainingRun'),
    ('--simulate-hang-after-steps', _bounded_int(1, 10**9), None,
     'demo/test switch: block the training loop forever after N steps'),
    ('--simulate-worker-block-after-items', _bounded_int(1, 10**9), None,
     'test switch: a DataLoader worker process fails after N samples (how: --simulate-worker-fault)'),
    ('--simulate-worker-fault', None, 'block',
     'test switch: block (waits in Python), stop (SIGSTOP: the process freezes) or kill (SIGKILL)'),
    ('--simulate-slow-preparation-seconds', _non_negative_float, 0.0,
     'test switch: every item of the data preparation takes this much longer (a slow volume)'),
    ('--simulate-preparation-hang-after-items', _bounded_int(1, 10**9), None,
     'test switch: the data preparation blocks forever after N items (a hung volume)'),
    ('--stall-report-seconds', _non_negative_float, 0.0,
     'watchdog: write a stall report after this long without a step (0: off)'),
    ('--startup-report-seconds', _non_negative_float, 0.0,
     'watchdog: the same before the first step (0: off)'),
    ('--attempt', _bounded_int(0, 1000), 0, 'attempt number set by the operator'),
    ('--collective-timeout-seconds', _positive_float, 600.0,
     'distributed runs: a collective that waits longer on a dead or frozen peer ends the process'),
    ('--checkpoint-interval-seconds', _non_negative_float, 600.0,
     'a mid-epoch checkpoint at most this often, bounding what a SIGKILL costs (0: at epoch ends only)'),
]
CHOICES = {'--device': ('auto', 'cpu', 'gpu', 'cuda'), '--dataset': ('synthetic', 'directory'),
           '--dataset-format': ('folders', 'decathlon'),
           '--data-path': ('auto', 'cache', 'stream'), '--simulate-worker-fault': ('block', 'stop', 'kill')}


def env_name(flag: str) -> str:
    return 'TRAINGUARD_' + flag.lstrip('-').replace('-', '_').upper()


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='trainguard-trainer', description='MONAI UNet segmentation training '
                                     'with a progress heartbeat for trainguard.')
    for flag, kind, default, text in OPTIONS:
        variable = env_name(flag)
        # argparse applies `type` to string defaults, so a bad environment value is reported
        # against its flag exactly like a bad command-line value.
        value = env.get(variable, default if default is None or isinstance(default, str) else str(default))
        parser.add_argument(flag, type=kind, default=value, choices=CHOICES.get(flag),
                            help=f'{text} (env {variable}, default {default})')
    return parser


def parse_config(argv: Sequence[str], env: Mapping[str, str]) -> TrainerConfig:
    parser = build_parser(env)
    args = parser.parse_args(argv)
    if args.crop_size > args.resolution:
        parser.error(f'argument --crop-size: must be <= --resolution ({args.resolution}), got {args.crop_size}')
    if len(args.strides) != len(args.channels) - 1:
        parser.error(f'argument --strides: must have one entry fewer than --channels, got {len(args.strides)}')
    return TrainerConfig(
        device=args.device, batch_size=args.batch_size, num_workers=args.num_workers, epochs=args.epochs,
        learning_rate=args.learning_rate, resolution=args.resolution, crop_size=args.crop_size,
        channels=args.channels, strides=args.strides, num_res_units=args.num_res_units, dataset=args.dataset,
        dataset_format=args.dataset_format, spatial_dims=args.spatial_dims, num_classes=args.num_classes,
        spacing=args.spacing, intensity_range=args.intensity_range,
        num_samples=args.num_samples, data_dir=args.data_dir, output_dir=args.output_dir, seed=args.seed,
        heartbeat_seconds=args.heartbeat_seconds, log_every_steps=args.log_every_steps,
        system_log_seconds=args.system_log_seconds, data_path=args.data_path, run_name=args.run_name,
        run_namespace=args.run_namespace, simulate_hang_after_steps=args.simulate_hang_after_steps,
        simulate_worker_block_after_items=args.simulate_worker_block_after_items,
        simulate_worker_fault=args.simulate_worker_fault,
        simulate_slow_preparation_seconds=args.simulate_slow_preparation_seconds,
        simulate_preparation_hang_after_items=args.simulate_preparation_hang_after_items,
        stall_report_seconds=args.stall_report_seconds, startup_report_seconds=args.startup_report_seconds,
        attempt=args.attempt, collective_timeout_seconds=args.collective_timeout_seconds,
        checkpoint_interval_seconds=args.checkpoint_interval_seconds,
    )


def main(argv: Sequence[str] | None = None) -> int:
    # A native crash (SIGSEGV, SIGABRT from C++) prints every thread's Python stack to the log.
    faulthandler.enable()
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s', stream=sys.stdout)
    config = parse_config(list(sys.argv[1:] if argv is None else argv), os.environ)
    sender = None
    if os.environ.get('RANK', '0') == '0':   # rank 0 beats for a gang
        import datetime

        from trainguard_trainer.heartbeat import KubernetesSender, log_only, send_starting

        # The first beat, before torch and MONAI load (seconds): the run shows the trainer
        # started. Without a run it goes to the log, where the first-heartbeat benchmark reads it.
        sender = KubernetesSender(config.run_name, config.run_namespace,
                                  retry_cap_seconds=config.heartbeat_seconds) if config.run_name else log_only
        world_size = os.environ.get('WORLD_SIZE', '1')
        send_starting(sender, config.epochs, datetime.datetime.now(datetime.UTC),
                      int(world_size) if world_size.isdigit() and int(world_size) > 0 else 1)
    from trainguard_trainer.startup import seed_matplotlib_cache

    seed_matplotlib_cache(os.environ)  # before MONAI's import pulls in matplotlib
    from trainguard_trainer.data import DatasetError
    from trainguard_trainer.guards import GpuOutOfMemory, GpuUnavailable
    from trainguard_trainer.stopping import Stopped
    from trainguard_trainer.train import train  # imported after parsing: --help and bad flags stay fast

    try:
        train(config, sender=sender)
    except DatasetError as error:
        logging.getLogger('trainguard_trainer').error('dataset: %s', error)
        return EXIT_DATASET
    except GpuUnavailable as error:
        # One line, last in the log: the kubelet quotes it (FallbackToLogsOnError) and the
        # operator puts it in status.message with reason GPUUnavailable.
        logging.getLogger('trainguard_trainer').error('%s', error)
        return EXIT_GPU_UNAVAILABLE
    except GpuOutOfMemory as error:
        logging.getLogger('trainguard_trainer').error('%s', error)
        return EXIT_GPU_OUT_OF_MEMORY
    except Stopped as stopped:
        logging.getLogger('trainguard_trainer').info('%s', stopped)
        return EXIT_STOPPED
    return 0
