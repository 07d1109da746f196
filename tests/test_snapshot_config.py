"""The [snapshot] config section: documented fields, validation naming the field."""
from dataclasses import fields

import pytest

from checkpoint.snapshot_config import SnapshotConfig
from comms import UserError


def test_every_field_is_documented_and_defaults_are_valid():
    SnapshotConfig().validate()
    assert all(f.metadata.get("doc") for f in fields(SnapshotConfig))


@pytest.mark.parametrize("kw,name", [
    ({"interval": -1}, "snapshot.interval"),
    ({"k": 3}, "snapshot.k/m"),
    ({"k": 200, "m": 100}, "snapshot.k/m"),
    ({"target_survival": 1.0}, "snapshot.target_survival"),
    ({"k": 3, "m": 1, "target_survival": 0.99}, "snapshot.target_survival"),
    ({"node_failure": -0.1}, "snapshot.node_failure"),
    ({"memory_mb": 0}, "snapshot.memory_mb"),
    ({"peer_port": 70000}, "snapshot.peer_port"),
    ({"peer_timeout_s": 0}, "snapshot.peer_timeout_s"),
])
def test_bad_values_name_the_field(kw, name):
    with pytest.raises(UserError, match=name.replace(".", r"\.").replace("/", "/")):
        SnapshotConfig(**kw).validate()
