"""The one error type a user can cause, and the one way it ends a command.

It lives in the bottom package so that every other package (which may only import
downwards) can raise it.
"""
from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """A problem the user can fix (bad config, missing file, wrong format, corrupt data).

    The message is one line that names the problem and the fix. Commands end with exit
    code 2 and no traceback when they meet one.
    """


def exits_on_user_error(main):
    """Wrap a command's ``main`` so a UserError prints one line and exits 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"kintsugi: error: {e}", file=sys.stderr, flush=True)
            if "torch.distributed" in sys.modules:  # a worker: leave without tearing gloo down
                from comms import dist_utils

                if dist_utils.initialized():
                    dist_utils.exit_process(2)
            raise SystemExit(2) from None

    return wrapper
