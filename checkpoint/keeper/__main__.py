"""``python -m checkpoint.keeper``: one node keeper process (started by ``start_keeper``)."""
from __future__ import annotations

import argparse
import logging

from checkpoint.format import human
from checkpoint.keeper.node import NodeKeeper
from checkpoint.keeper.runtime import Instance, collect_garbage, read_token, shm_free
from checkpoint.keeper.server import KeeperServer

log = logging.getLogger("checkpoint.keeper")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m checkpoint.keeper", description="A Kintsugi node keeper.")
    p.add_argument("--sock", required=True)
    p.add_argument("--token-file", required=True)
    p.add_argument("--host-memory-mb", type=int, default=4096)
    p.add_argument("--timeout-s", type=float, default=60.0)
    p.add_argument("--agent-pid", type=int, default=None)
    p.add_argument("--exit-on-bye", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s keeper[%(process)d] %(message)s")
    token = read_token(a.token_file)
    for name in collect_garbage():  # memory of keepers killed before they could unlink it
        log.info("removed %s, left by a dead keeper", name)
    instance = Instance()
    budget, warning = a.host_memory_mb << 20, ""
    free = shm_free()
    if free < budget:
        # What fits, said once to the trainers (rank 0 prints it): a save that does not fit
        # then goes to disk directly instead of dying with SIGBUS in a half-mapped slot.
        warning = (f"/dev/shm has {human(free)} free, less than checkpoint.host_memory_mb={a.host_memory_mb}: "
                   f"the node keeper holds snapshots in {human(free)} (enlarge /dev/shm, e.g. docker --shm-size, "
                   "or lower checkpoint.host_memory_mb)")
        log.warning("%s", warning)
        budget = free
    node = NodeKeeper(instance, budget, warning)
    server = KeeperServer(node, a.sock, token, a.timeout_s, a.agent_pid, a.exit_on_bye)
    log.info("serving %s (budget %d MiB, instance %s)", a.sock, budget >> 20, instance.name)
    try:
        server.serve()
    finally:
        instance.close()


if __name__ == "__main__":
    main()
