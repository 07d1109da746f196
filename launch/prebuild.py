"""Build the C++ ops DeepSpeed compiles at a CPU job's first start, once, before any job runs.

DeepSpeed's CPU accelerator builds its shared-memory communication op the first time an
engine starts, under a lock file in ``TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``). A job killed during that build (a crash drill, a scheduler's
kill) leaves the lock behind, and every later DeepSpeed start on the machine waits on it for
ever, silently. ``python -m launch.prebuild`` builds the op now (instant when it is built),
and refuses, in one line, to wait on a lock nothing has touched for ten minutes.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from comms import UserError, exits_on_user_error

STALE_S = 600  # a build takes minutes; a lock untouched for longer belongs to a dead build


def extensions_dir() -> Path:
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


@exits_on_user_error
def main() -> int:
    try:
        from deepspeed.accelerator import get_accelerator
        import deepspeed.ops
    except ImportError:
        print("kintsugi: DeepSpeed is not installed: nothing to build")
        return 0
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        print("kintsugi: this DeepSpeed accelerator builds no op at start: nothing to build")
        return 0
    for lock in extensions_dir().glob(f"*/{builder.NAME}/lock"):
        if time.time() - lock.stat().st_mtime > STALE_S:
            raise UserError(f"{lock} is left from a DeepSpeed build that was killed (untouched for "
                            f"{(time.time() - lock.stat().st_mtime) / 60:.0f} min): remove it (rm {lock}) and rerun")
    t0 = time.perf_counter()
    builder.load(verbose=False)
    print(f"kintsugi: DeepSpeed's {builder.NAME} op is built ({time.perf_counter() - t0:.1f} s) in {extensions_dir()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
