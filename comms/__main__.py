"""``python -m comms``: this node's network and accelerators as Kintsugi's placement sees them
(the node entry that `kintsugi plan` topologies are made of)."""
import dataclasses
import json

from comms.topology import detect_local_node

print(json.dumps(dataclasses.asdict(detect_local_node()), indent=1, default=str))
