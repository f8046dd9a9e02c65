"""A real guest reads the host card through ``ccidbridge run`` on every QEMU (7.2, 10.0,
11.1), with answers equal to host-direct pyscard; the guests are Debian 12's (kernel
6.1, pcscd 1.9), Debian 13's (6.12, pcscd 2.3, libccid 1.6) and sid's (7.2, pcscd 2.5,
libccid 1.8), built from the roots (lab/guest/stackguest.py).

The QEMU arguments are what ``ccidbridge qemu-argv --usb`` prints for that
stack's QEMU and libvirt (tests/test_guest.py covers the rest of the guest's
behaviour on this machine's stack).
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from ccidbridge.config import load
from ccidbridge.config.layout import layout
from ccidbridge.config.qemu_argv import render
from lab.bridgeproc import BridgeProcess, write_config
from lab.guest import GuestBuildError, GuestImage
from lab.guest import boot as guest_boot
from lab.guest.stackguest import build_stack_guest
from lab.pcsc import direct_transmit
from lab.stacks import STACKS, Stack, by_name
from lab.vpcd_card import ATR_PRESETS
from tests.fixtures_libvirt import require_stack, target
from tests.test_guest import APDUS, SELECT_FILE

pytestmark = [pytest.mark.guest, pytest.mark.stack, pytest.mark.qemu]
#: the chained case: a 1000-byte answer comes as 61xx + GET RESPONSE within 374 bytes
CHAINED = ["801000000003E8", "00C0000000", "00C0000000", "00C00000E8", SELECT_FILE]


@pytest.fixture(scope="session", params=[s.name for s in STACKS], ids=lambda n: f"guest-{n}")
def stack_guest(request: pytest.FixtureRequest) -> GuestImage:
    """Each stack's guest image (built by ``make setup``; cached)."""
    stack = by_name(request.param)
    require_stack(stack)
    try:
        return build_stack_guest(stack)
    except GuestBuildError as exc:
        pytest.fail(f"the {stack.name} guest cannot be built: {exc}", pytrace=False)


def _device_args(config: Path, stack: Stack) -> list[str]:
    version = target(stack)
    return shlex.split(render(layout(load(str(config)).devices, version.libvirt), version,
                              add_usb=True))


def _boot(qemu_stack: Stack, image: GuestImage, config: Path, **kwargs):  # noqa: ANN003, ANN202
    qemu_stack.enter()
    return guest_boot.boot_guest(image, _device_args(config, qemu_stack),
                                 qemu=qemu_stack.executable("qemu-system-x86_64"), **kwargs)


def test_guest_gets_the_same_answers_as_the_host(qemu_stack: Stack, stack_guest: GuestImage,
                                                 test_card, tmp_path: Path) -> None:  # noqa: ANN001
    card = test_card("dual")
    expected = direct_transmit(card.reader, [bytes.fromhex(a) for a in APDUS + CHAINED[:1]])
    card.restart()  # the same fresh card state for the guest
    config = write_config(tmp_path / "vm.xml", tmp_path / "vsc.sock", card.reader)
    with BridgeProcess(config, tmp_path / "bridge.log") as bridge:
        run = _boot(qemu_stack, stack_guest, config, apdus=APDUS + CHAINED, timeout=50)
        run.check()
        assert "QEMU synchronized" in bridge.text()
    assert run.atr == ATR_PRESETS["dual"]
    assert f"kernel={stack_guest.kernel_version}" in "\n".join(run.lines)
    got = [x.response for x in run.apdus]
    assert got[:len(APDUS)] == expected[:-1]
    # the 1000-byte answer: served as 61xx + GET RESPONSE, the same bytes as host-direct
    chained = got[len(APDUS):len(APDUS) + 4]
    assert [c[-2:] for c in chained] == [b"\x61\x00", b"\x61\x00", b"\x61\xe8", b"\x90\x00"]
    assert b"".join(c[:-2] for c in chained) + b"\x90\x00" == expected[-1]
    assert got[-1][-2:] == b"\x90\x00"
    assert all(x.rv == 0 and len(x.response) <= 374 for x in run.apdus)
