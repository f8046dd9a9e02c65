"""``<pin-guard>`` and ``<policy>``: read into the neutral spec, bad rules as
``FILE:LINE`` errors, never in the libvirt or QEMU output."""

from __future__ import annotations

import pytest

from ccidbridge.config import ConfigError, loads
from ccidbridge.config.libvirt_xml import render as render_libvirt
from ccidbridge.config.qemu_argv import QemuVersion
from ccidbridge.config.qemu_argv import render as render_argv
from ccidbridge.spec import ApduPolicy, PinGuardSpec

CARD = """<ccidbridge>
  <smartcard mode='passthrough' type='unix'>
    <source mode='bind' path='/run/ccidbridge/vm.sock'/>
{}
  </smartcard>
</ccidbridge>
"""
POLICY = """    <pin-guard keep='2'/>
    <policy>
      <allow aid='D27600012401' ins='47' p1='81'/>
      <deny aid='D27600012401' ins='47 DA DB'/>
      <deny ins='E6 44'/>
      <deny cla='80/F0' ins='E0-EF' p1='00' p2='9A'/>
    </policy>"""


def test_defaults_keep_one_try_and_no_rules() -> None:
    (card,) = loads(CARD.format("")).served_cards()
    assert card.pin_guard.keep == 1
    assert card.policy == ApduPolicy()


def test_rules_are_read_in_order_with_ranges_masks_and_lines() -> None:
    (card,) = loads(CARD.format(POLICY), "vm.xml").served_cards()
    assert card.pin_guard == PinGuardSpec(keep=2, line=4)
    allow, deny_app, deny_any, masked = card.policy.rules
    assert allow.allow and allow.aid == bytes.fromhex("D27600012401")
    assert allow.ins == {0x47} and allow.p1 == {0x81} and allow.cla is None
    assert not deny_app.allow and deny_app.ins == {0x47, 0xDA, 0xDB} and deny_app.line == 7
    assert deny_any.aid is None and deny_any.ins == {0xE6, 0x44}
    assert masked.cla == frozenset(range(0x80, 0x90)) and masked.ins == frozenset(range(0xE0, 0xF0))
    assert masked.p2 == {0x9A}
    assert deny_app.text == "<deny aid='D27600012401' ins='47 DA DB'/>"


def test_none_of_it_reaches_libvirt_or_qemu() -> None:
    config = loads(CARD.format(POLICY))
    out = render_libvirt(config.layout, QemuVersion(7, 2), portable=False)
    out += render_argv(config.layout, QemuVersion(7, 2))
    for word in ("pin-guard", "policy", "deny", "allow", "D27600012401"):
        assert word not in out


@pytest.mark.parametrize(("inner", "line", "words"), [
    ("<pin-guard keep='16'/>", 4, ["keep='16'", "0-15"]),
    ("<pin-guard keep='-1'/>", 4, ["0-15"]),
    ("<pin-guard tries='1'/>", 4, ["no attribute 'tries'", "keep"]),
    ("<pin-guard/><pin-guard/>", 4, ["at most one <pin-guard>"]),
    ("<policy><deny ins='4'/></policy>", 4, ["ins='4'", "'DA DB'"]),
    ("<policy>\n<deny ins='EF-E0'/></policy>", 5, ["range EF-E0 is empty", "'E0-EF'"]),
    ("<policy>\n\n<deny cla='81/F0'/></policy>", 6, ["81/F0 matches nothing", "'80/F0'"]),
    ("<policy><deny aid='D2760'/></policy>", 4, ["aid='D2760'", "1-16 hex bytes"]),
    ("<policy><deny aid=''/></policy>", 4, ["aid=''"]),
    ("<policy><permit ins='47'/></policy>", 4, ["unexpected <permit>", "<allow>, <deny>"]),
    ("<policy><deny ins='47'>x</deny></policy>", 4, ["holds text"]),
    ("<policy><deny ins='47' le='00'/></policy>", 4, ["no attribute 'le'"]),
    ("<policy default='deny'/>", 4, ["no attribute 'default'"]),
])
def test_bad_rules_are_file_line_errors(inner: str, line: int, words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        loads(CARD.format("    " + inner), "vm.xml")
    text = str(err.value)
    assert text.startswith(f"vm.xml:{line}: "), text
    for word in words:
        assert word in text, text
