"""Bad configs: every error is one ``FILE:LINE: what is wrong, what is allowed`` line.

ERRORS is the notes' table of libvirt 9.0 errors for these devices (plus the
ones found with the oracle); tests/test_libvirt_oracle_errors.py checks each
one against the real libvirt, this file checks ccidbridge's own message.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ccidbridge.cli import main
from ccidbridge.config import ConfigError, load, loads
from ccidbridge.config.layout import layout
from ccidbridge.config.libvirt_xml import render as render_libvirt
from ccidbridge.config.qemu_argv import QemuVersion
from ccidbridge.config.qemu_argv import render as render_argv
from lab.examples_regen import configs

TCP = "<smartcard mode='passthrough' type='tcp'>{}</smartcard>"
CERTS = "<smartcard mode='host-certificates'>{}</smartcard>"
C = "<certificate>c</certificate>"

# id: (devices, the libvirt 9.0 error, words ccidbridge's message must hold)
ERRORS = {
    "second-card-slot": ("<smartcard mode='host'><address type='ccid' controller='0' "
                         "slot='1'/></smartcard>",
                         "this QEMU binary lacks multiple smartcard support", ["slot='0'"]),
    "controller-1": ("<smartcard mode='host'><address type='ccid' controller='1' slot='0'/>"
                     "</smartcard>",
                     "this QEMU binary lacks multiple smartcard support", ["controller='0'"]),
    "no-type": ("<smartcard mode='passthrough'/>",
                "passthrough mode requires a character device type attribute", ["type='tcp'"]),
    "bad-type": ("<smartcard mode='passthrough' type='bogus'/>",
                 "unknown type presented to host for character device: bogus", ["unix"]),
    "bad-mode": ("<smartcard mode='bogus'/>",
                 "Invalid value for attribute 'mode' in element 'smartcard': 'bogus'",
                 ["host|host-certificates|passthrough"]),
    "no-mode": ("<smartcard/>", "Missing required attribute 'mode' in element 'smartcard'",
                ["host|host-certificates|passthrough"]),
    "two-certificates": (CERTS.format(C * 2), "host-certificates mode needs exactly three "
                         "certificates", ["exactly three", "found 2"]),
    "four-certificates": (CERTS.format(C * 4), "host-certificates mode needs exactly three "
                          "certificates", ["exactly three", "found 4"]),
    "relative-database": (CERTS.format(C * 3 + "<database>etc/pki</database>"),
                          "expecting absolute path: etc/pki", ["absolute"]),
    "bad-protocol": (TCP.format("<source mode='bind' host='h' service='1'/>"
                                "<protocol type='bogus'/>"),
                     "Unknown protocol 'bogus'", ["raw|telnet|telnets|tls"]),
    "tls-on": (TCP.format("<source mode='bind' host='h' service='1' tls='on'/>"),
               "Invalid value for attribute 'tls' in element 'source': 'on'", ["yes|no"]),
    "no-host": (TCP.format("<source mode='connect' service='2001'/>"),
                "Missing source host attribute for char device", ["host="]),
    "no-service": (TCP.format("<source mode='bind' host='h'/>"),
                   "Missing source service attribute for char device", ["service="]),
    "no-path": ("<smartcard mode='passthrough' type='unix'><source mode='connect'/></smartcard>",
                "Missing source path attribute for char device", ["path="]),
    "bad-source-mode": (TCP.format("<source mode='foo' host='h' service='1'/>"),
                        "Invalid value for attribute 'mode' in element 'source': 'foo'",
                        ["bind|connect"]),
    "reconnect-bind": (TCP.format("<source mode='bind' host='h' service='1'><reconnect "
                                  "enabled='yes' timeout='3'/></source>"),
                       "chardev reconnect is possible only for connect mode", ["connect"]),
    "reconnect-no-timeout": (TCP.format("<source mode='connect' host='h' service='1'><reconnect "
                                        "enabled='yes'/></source>"),
                             "Missing required attribute 'timeout' in element 'reconnect'",
                             ["timeout="]),
    "reconnect-zero": (TCP.format("<source mode='connect' host='h' service='1'><reconnect "
                                  "enabled='yes' timeout='0'/></source>"),
                       "chardev reconnect source timeout cannot be '0'", ["1 or more"]),
    "usb-address-on-card": ("<smartcard mode='host'><address type='usb' bus='0' port='1'/>"
                            "</smartcard>",
                            "Controllers must use the 'ccid' address type", ["type='ccid'"]),
    "two-sources": (TCP.format("<source mode='connect' host='h' service='1'/><source "
                               "mode='bind' host='h' service='2'/>"),
                    "only one source element is allowed for character device", ["one"]),
    "channel-no-target": ("<channel type='spicevmc'/>",
                          "target type must be specified for channel device",
                          ["type='virtio'"]),
    "channel-no-target-type": ("<channel type='spicevmc'><target/></channel>",
                               "unknown target type '(null)' specified for character device",
                               ["type='virtio'"]),
    "channel-bad-name": ("<channel type='spicevmc'><target type='virtio' name='foo'/></channel>",
                         "Unsupported spicevmc target name 'foo'", ["com.redhat.spice.0"]),
}


def _error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        loads(text, "vm.xml")
    return info.value


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_libvirt_error_caught_with_line(case: str) -> None:
    devices, libvirt_message, words = ERRORS[case]
    err = _error(f"<ccidbridge>\n\n{devices}\n</ccidbridge>")
    message = str(err)
    assert message.startswith("vm.xml:3: "), message
    assert "\n" not in message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize(("text", "line", "words"), [
    (b"", 1, "empty"),
    (b"   \n\n", 1, "empty"),
    (b"not xml at all", 1, "not well-formed"),
    (b"<ccidbridge>\n<smartcard mode='host'>\n</ccidbridge>", 3, "not well-formed"),
    (b"<domain type='kvm'/>", 1, "expected <ccidbridge>"),
    (b"<?xml version='1.0'?>\n<!DOCTYPE x [<!ENTITY a 'aaaa'>]>\n<ccidbridge>&a;</ccidbridge>",
     2, "refused"),
    (b"<!DOCTYPE ccidbridge SYSTEM 'file:///etc/passwd'><ccidbridge/>", 1, "refused"),
    (b"<ccidbridge>&unknown;</ccidbridge>", 1, "not well-formed"),
    (b"<ccidbridge>\n  <disk/>\n</ccidbridge>", 2, "allowed: <smartcard>"),
    (b"<ccidbridge>\n  <smartcard mode='host' foo='1'/>\n</ccidbridge>", 2, "allowed: mode"),
    (b"<ccidbridge>\n  <controller type='usb'/>\n</ccidbridge>", 2, "type='ccid'"),
    (b"<ccidbridge>\n  <controller type='ccid' index='0'/><controller type='ccid' index='0'/>"
     b"\n</ccidbridge>", 2, "each index once"),
    (b"<ccidbridge>\n<smartcard mode='passthrough' type='unix'><source path='rel'/></smartcard>"
     b"</ccidbridge>", 2, "absolute"),
    (b"<ccidbridge>\n<smartcard mode='passthrough' type='tcp'><source host='h' service='70000'/>"
     b"</smartcard></ccidbridge>", 2, "1-65535"),
    (b"<ccidbridge>\n<smartcard mode='passthrough' type='tcp'><source host='h' service='1'/>"
     b"<reader atr='3B 8'/></smartcard></ccidbridge>", 2, "hex bytes"),
    (b"<ccidbridge>\n<smartcard mode='passthrough' type='tcp'><source host='h' service='1'/>"
     b"<reader name='a' match='b*'/></smartcard></ccidbridge>", 2, "not both"),
    (b"<ccidbridge>\n<smartcard mode='passthrough' type='tcp'><source host='h' service='1'/>"
     b"<reader atr='3B00' atr-mask='FF'/></smartcard></ccidbridge>", 2, "same length"),
    (b"<ccidbridge>\n<smartcard mode='passthrough' type='tcp'><source host='h' service='1'/>"
     b"<reader timeout='-1'/></smartcard></ccidbridge>", 2, "seconds > 0"),
    (b"<ccidbridge>\n<smartcard mode='host'><reader/></smartcard></ccidbridge>", 2,
     "allowed: <address>"),
    (b"<ccidbridge><smartcard mode='host'/>\n<smartcard mode='host'><address type='ccid' "
     b"controller='0'/></smartcard></ccidbridge>", 2, "only the first"),
    (b"<ccidbridge><smartcard mode='passthrough' type='unix'><source path='/s'/></smartcard>\n"
     b"<smartcard mode='passthrough' type='unix'><source path='/s'/></smartcard></ccidbridge>",
     2, "each card needs its own socket"),
    (b"<ccidbridge><smartcard mode='host'/>\n<smartcard mode='passthrough' type='spicevmc'/>"
     b"</ccidbridge>", 2, "tcp or unix"),
    (b"<ccidbridge>\n<smartcard mode='host-certificates'><database>/d</database>" + b"<certificate>"
     b"c</certificate>" * 3 + b"</smartcard></ccidbridge>", 2, "first, then <database>"),
])
def test_bad_document(text: bytes, line: int, words: str) -> None:
    err = _error(text)  # type: ignore[arg-type]
    assert str(err).startswith(f"vm.xml:{line}: "), str(err)
    assert words in str(err), str(err)
    assert "\n" not in str(err)


def test_missing_file_and_cli_exit_status(tmp_path, capsys) -> None:
    missing = tmp_path / "nope.xml"
    with pytest.raises(ConfigError, match="cannot read"):
        load(str(missing))
    bad = tmp_path / "bad.xml"
    bad.write_text("<ccidbridge>\n<smartcard/>\n</ccidbridge>\n")
    for command in ("check", "libvirt", "qemu-argv"):
        assert main([command, str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"{bad}:2: "), err
    assert main(["check", str(missing)]) == 2
    assert "Traceback" not in capsys.readouterr().err


EXAMPLE_TEXTS = [p.read_text(encoding="utf-8") for p in configs()]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(EXAMPLE_TEXTS), st.data())
def test_mutated_configs_never_crash(text: str, data: st.DataObject) -> None:
    """Any edit of an example either loads and renders, or is one ConfigError."""
    start = data.draw(st.integers(0, len(text)))
    end = data.draw(st.integers(start, min(len(text), start + 12)))
    insert = data.draw(st.sampled_from(["", "'", "<", ">", "/>", "&", "0", "99", "bind",
                                        "connect", " tls='yes'", "<reader/>", "-", "x", "\x00",
                                        "<address type='ccid' controller='0'/>", "é", "]]>"]))
    mutated = text[:start] + insert + text[end:]
    try:
        config = loads(mutated, "m.xml")
    except ConfigError as exc:
        assert str(exc).startswith("m.xml")
        return
    lay = layout(config.devices)
    render_libvirt(lay, QemuVersion(7, 2))
    render_argv(lay, QemuVersion(5, 2), add_usb=True)
    config.served_cards()
    config.unserved()
