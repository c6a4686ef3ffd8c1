"""hybridtrain's one exception family: every error meant for the user derives from `HybridtrainError`.

The `hybridtrain` command (`cluster.cli.main`) catches `HybridtrainError` alone, prints
`hybridtrain: error: <message>` and exits with the class's `exit_code`:

    2  usage and data errors: the command line, a config value or file, a data file, a directory or
       job the user named. Fix the input and run again (2 is also what argparse exits with).
    1  a run, job or check that started and did not finish or did not pass: training failed, an
       unusable checkpoint, an ONNX export that does not reproduce the model. Its message says what
       is kept and how to resume.
    3  cluster or infrastructure trouble: no Ray at the address, a dashboard that does not answer or
       refuses the token, a head node that will not start. Nothing is wrong with the input; trying
       again later (or elsewhere) may work.

Anything else (a `ValueError`, `KeyError` or `RuntimeError` raised by a bug) is not caught and ends
in a traceback, so a bug is never reported as the user's mistake. `KeyboardInterrupt` exits 130.

Classes keep the builtin base that callers catch today (`ConfigError` is still a `ValueError`,
`RunError` a `RuntimeError`, `NotFoundError` a `FileNotFoundError`). This module sits at the bottom
of the import graph and imports nothing, so every package can raise these without importing Ray.
"""

from __future__ import annotations

USAGE_EXIT = 2
FAILED_EXIT = 1
CLUSTER_EXIT = 3


class HybridtrainError(Exception):
    """An error meant for the user: the message says what is wrong and what to do; `exit_code` is the
    `hybridtrain` command's exit status for it."""

    exit_code: int = FAILED_EXIT


class UsageError(HybridtrainError, ValueError):
    """The command, an option or a named path cannot be used as given."""

    exit_code = USAGE_EXIT


class NotFoundError(UsageError, FileNotFoundError):
    """A file or directory the user named does not exist or is not what the command needs."""


class ConfigError(UsageError):
    """A config value, key or file that cannot be used; the message names the field as `section.key`."""


class DataError(UsageError):
    """A data file that is missing or malformed; the message names the file and what is wrong."""


class ReportError(UsageError):
    """The directory is neither a run nor a sweep, or its files cannot be read."""


class ExportError(UsageError):
    """A run directory whose model cannot be rebuilt or exported: files missing or unreadable, a bad opset."""


class RunError(HybridtrainError, RuntimeError):
    """Training did not finish; the message says why and where its state is."""

    exit_code = FAILED_EXIT


class CheckpointError(HybridtrainError, RuntimeError):
    """A checkpoint that cannot be resumed from (missing, truncated, corrupt, incomplete): the run cannot
    continue from it; the message names the checkpoint and its first problem."""

    exit_code = FAILED_EXIT


class VerificationError(HybridtrainError, RuntimeError):
    """The exported graph does not reproduce the PyTorch model's logits; the message gives the figures."""

    exit_code = FAILED_EXIT


class ClusterError(HybridtrainError, RuntimeError):
    """The Ray cluster cannot be reached, refuses us, or cannot be started or stopped."""

    exit_code = CLUSTER_EXIT


class JobError(ClusterError):
    """The Jobs API cannot be reached or refuses us, or a head node will not start. (A job that ran and
    failed is not an error: `hybridtrain submit --wait` and `jobs logs --follow` exit 1 with its status.)"""
