"""The one exception type for bad input: configs, data, files, checkpoints, command-line values.

Every message names the problem and the fix. ``lora2``'s command line turns exactly these (and
missing files or packages) into exit code 2 with the message; anything else is a bug and keeps
its traceback. A subclass of ValueError, so ``except ValueError`` in user code still catches it.
Also the exit code of an interrupted run, shared by the command line and compare's workers.
"""

from __future__ import annotations

# The exit code of a run stopped by SIGINT / SIGTERM (the shell's 128 + SIGINT), for the command line
# and for compare's worker processes alike.
EXIT_INTERRUPTED = 130


class InputError(ValueError):
    """Input lora2 cannot use; the message says why and what to do."""
