"""The pure parts of attach/detach and the hook: ids, the QMP steps and their undo,
what QEMU's refusals mean, when the hook acts, the metadata element."""

from __future__ import annotations

from typing import Any

import pytest

from ccidbridge.lifecycle import hook, metadata, plan
from ccidbridge.lifecycle.attach import AttachError, check_devices
from ccidbridge.lifecycle.monitor import MonitorError
from ccidbridge.spec import Endpoint, ReaderSpec, ServedCard


def _card(ep: Endpoint) -> ServedCard:
    return ServedCard("vm.xml:3 smartcard0", ep, ReaderSpec())


UNIX_QEMU_LISTENS = Endpoint("unix", bridge_listens=False, path="/run/ccidbridge/vm.sock")
TCP_BRIDGE_LISTENS = Endpoint("tcp", bridge_listens=True, host="127.0.0.1", port=2001)


def test_ids_round_trip_and_other_ids_are_not_ours() -> None:
    [cid] = plan.ids("0123abcd", 4242, 1)
    assert cid.ccid == "ccidbridge-0123abcd-4242-0-ccid"
    for role in plan.ROLES:
        assert plan.parse_id(cid.of(role)) == (cid, role)
    for other in ("ccid0", "smartcard0", "usb", "ccidbridge-xyz-1-0-ccid", "charsmartcard0"):
        assert plan.parse_id(other) is None


def test_config_tag_names_the_absolute_path(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.chdir(tmp_path)
    assert plan.config_tag("vm.xml") == plan.config_tag(str(tmp_path / "vm.xml"))
    assert len(plan.config_tag("vm.xml")) == 8


def test_steps_add_reader_chardev_card_each_with_its_undo() -> None:
    cards = [_card(UNIX_QEMU_LISTENS), _card(TCP_BRIDGE_LISTENS)]
    ids = plan.ids("0123abcd", 7, 2)
    steps = plan.attach_steps(cards, ids, [None, 5], reconnect_ms=False)
    assert [(s.command, s.creates) for s in steps] == [
        ("device_add", ids[0].ccid), ("chardev-add", ids[0].char), ("device_add", ids[0].card),
        ("device_add", ids[1].ccid), ("chardev-add", ids[1].char), ("device_add", ids[1].card),
    ]
    assert steps[0].arguments == {"driver": "usb-ccid", "id": ids[0].ccid}  # no bus/port (A3)
    assert steps[2].arguments == {"driver": "ccid-card-passthru", "id": ids[0].card,
                                  "chardev": ids[0].char, "bus": f"{ids[0].ccid}.0"}
    assert [s.undo[0] for s in steps[:3]] == ["device_del", "chardev-remove", "device_del"]
    assert steps[1].arguments["backend"] == {"type": "socket", "data": {
        "addr": {"type": "unix", "data": {"path": "/run/ccidbridge/vm.sock"}},
        "server": True, "wait": False}}
    assert steps[4].arguments["backend"]["data"] == {
        "addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "2001"}},
        "server": False, "reconnect": 5}


@pytest.mark.parametrize(("reconnect", "ms", "key", "value"), [
    (None, False, "reconnect", 1), (None, True, "reconnect-ms", 1000),
    (0, False, "reconnect", 0), (3, True, "reconnect-ms", 3000),
])
def test_a_dialling_chardev_reconnects(reconnect, ms, key, value) -> None:  # noqa: ANN001
    data = plan.chardev_backend(TCP_BRIDGE_LISTENS, reconnect, ms)["data"]
    assert data[key] == value and ("reconnect" in data) != ("reconnect-ms" in data)


def test_find_groups_our_objects_by_card() -> None:
    a, b = plan.ids("0123abcd", 7, 2)
    found = plan.find(["usb", a.ccid, a.card, b.card, "ccid0"],
                      ["charserial0", a.char, b.char, a.ccid])
    assert found.devices == {a: {"ccid", "card"}, b: {"card"}}
    assert found.chardevs == {a, b}
    assert found.owners() == {("0123abcd", 7)}


@pytest.mark.parametrize(("qemu_says", "we_say"), [
    ("No 'usb-bus' bus found for device 'usb-ccid'", "has no USB controller"),
    ("tried to attach usb device QEMU USB CCID to a bus with no free ports", "no free port"),
    ("'usb-ccid' is not a valid device model name", "lacks a smartcard device"),
    ("Failed to bind socket to /x: Address already in use", "in use by another program"),
    ("something else", "something else"),
])
def test_qemu_refusals_are_explained(qemu_says: str, we_say: str) -> None:
    text = plan.explain(f"device_add: {qemu_says}", "domain vm1")
    assert text.startswith("domain vm1") and we_say in text


class _Monitor:
    where = "domain vm1"

    def __init__(self, types: set[str]) -> None:
        self.types = types

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        assert command == "device-list-properties" and arguments
        if arguments["typename"] not in self.types:
            raise MonitorError("Device 'x' not found", "DeviceNotFound")
        return []


def test_a_qemu_without_the_devices_is_refused_before_anything_changes() -> None:
    check_devices(_Monitor({"usb-ccid", "ccid-card-passthru"}))  # type: ignore[arg-type]
    with pytest.raises(AttachError, match="this QEMU has no ccid-card-passthru device"):
        check_devices(_Monitor({"usb-ccid"}))  # type: ignore[arg-type]


@pytest.mark.parametrize(("op", "sub", "listens", "action"), [
    ("prepare", "begin", True, hook.Action(start=True, wait_listening=True)),
    ("prepare", "begin", False, hook.Action()),
    ("started", "begin", False, hook.Action(start=True)),
    ("started", "begin", True, hook.Action()),
    ("start", "begin", True, hook.Action()),
    ("stopped", "end", False, hook.Action(stop=True)),
    ("release", "end", True, hook.Action(stop=True)),
    ("migrate", "begin", True, hook.Action()),
    ("reconnect", "begin", False, hook.Action()),
])
def test_hook_acts_in_the_order_the_chardev_direction_needs(op, sub, listens, action) -> None:  # noqa: ANN001
    assert hook.decide(op, sub, listens) == action


def test_systemd_instances_are_the_configs_in_etc_ccidbridge() -> None:
    assert hook.systemd_instance("/etc/ccidbridge/vm1.xml") == "vm1"
    for other in ("/etc/ccidbridge/sub/vm1.xml", "/srv/vm1.xml", "/etc/ccidbridge/vm 1.xml",
                  "/etc/ccidbridge/vm1.conf"):
        assert hook.systemd_instance(other) is None


def test_metadata_round_trip_and_what_is_not_ours() -> None:
    path = "/etc/ccidbridge/it's & <odd>.xml"
    domain = f"<domain><name>x</name><metadata>{metadata.render(path)}</metadata></domain>"
    assert metadata.config_of(domain.encode()) == path
    assert metadata.config_of(b"<domain><metadata><other xmlns='urn:x' config='/a'/>"
                              b"</metadata></domain>") is None
    assert metadata.config_of(b"<domain/>") is None
    assert metadata.config_of(b"not xml") is None
    assert metadata.config_of(b"<!DOCTYPE d [<!ENTITY e SYSTEM '/etc/passwd'>]>"
                              b"<domain>&e;</domain>") is None
