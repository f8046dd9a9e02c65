"""Bad configs: every error is one ``FILE:LINE: what is wrong, what is allowed`` line.

ERRORS is the table of libvirt 9.0's errors for these devices
(docs/libvirt-facts.md#L15); tests/test_libvirt_oracle_errors.py checks each one
against the real libvirt, this file checks ccidbridge's own message.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ccidbridge import cli
from ccidbridge.cli import main
from ccidbridge.config import ConfigError, load, loads
from ccidbridge.config.document import MAX_BYTES
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


# ------------------------------------------------------------------ bounded, linear loading

BIG_LINES = 70_000  # lxml keeps sourceline in 16 bits: setting one past 65535 overflows


def _cli(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    """``ccidbridge ARGS`` as a user runs it: a separate process, its exit status and stderr."""
    return subprocess.run([sys.executable, "-m", "ccidbridge", *map(str, args)],
                          capture_output=True, text=True, timeout=60, check=False)


def _refused(path: os.PathLike[str] | str, start: str, words: str) -> None:
    for command in ("check", "libvirt", "qemu-argv"):
        done = _cli(command, path)
        assert done.returncode == 2, done
        assert done.stderr.startswith(start) and words in done.stderr, done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr


def _padded(devices: str, lines: int) -> bytes:
    return ("<ccidbridge>" + "\n" * lines + devices + "</ccidbridge>\n").encode()


def test_a_file_over_the_cap_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.xml"
    big.write_bytes(b"<ccidbridge>" + b" " * MAX_BYTES + b"</ccidbridge>")
    _refused(big, f"{big}: ", f"{MAX_BYTES} bytes at most")
    fits = tmp_path / "fits.xml"
    fits.write_bytes(b"<ccidbridge>" + b" " * (MAX_BYTES - 100) + b"</ccidbridge>")
    assert _cli("check", fits).returncode == 0
    with pytest.raises(ConfigError, match="more than a config can be"):
        loads(b"<ccidbridge>" + b" " * MAX_BYTES + b"</ccidbridge>", "vm.xml")


def test_not_a_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.xml"
    os.mkfifo(fifo)  # nobody writes: reading it would block for ever
    _refused(fifo, f"{fifo}: ", "a FIFO")
    _refused("/dev/zero", "/dev/zero: ", "a character device")  # would never end
    _refused(tmp_path, f"{tmp_path}: ", "a directory")


def test_more_than_65535_lines(tmp_path: Path) -> None:
    """Lines past lxml's 16-bit sourceline are reported right, also for multi-line tags."""
    card = "<smartcard\n mode='bogus'/>"
    with pytest.raises(ConfigError) as info:
        loads(_padded(card, BIG_LINES), "vm.xml")
    assert str(info.value).startswith(f"vm.xml:{BIG_LINES + 1}: "), info.value
    bad = tmp_path / "long.xml"
    bad.write_bytes(_padded("<smartcard/>", BIG_LINES))
    _refused(bad, f"{bad}:{BIG_LINES + 1}: ", "needs mode=")
    good = loads(_padded("<smartcard mode='passthrough' type='tcp'>\n<source host='127.0.0.1' "
                         "service='1'/></smartcard>", BIG_LINES), "vm.xml")
    assert good.served_cards()[0].label == f"vm.xml:{BIG_LINES + 1} smartcard0"
    broken = tmp_path / "broken.xml"
    broken.write_bytes(b"<ccidbridge>" + b"\n" * BIG_LINES + b"<smartcard")
    _refused(broken, f"{broken}:{BIG_LINES + 1}: ", "not well-formed")


@pytest.mark.parametrize(("data", "line", "words"), [
    (b"<ccidbridge>" * 300 + b"</ccidbridge>" * 300, 1, "not well-formed"),  # deep
    (b"\x00\x01\x02\xff\xfe binary", 1, "not well-formed"),
    (b"<ccidbridge>\x00</ccidbridge>", 1, "not well-formed"),
    (b"\xff\xfe" + "<ccidbridge>\n<x/></ccidbridge>".encode("utf-16-le"), 2, "<x>"),
    (b"<?xml version='1.0' encoding='no-such-codec'?><ccidbridge/>", 1, "encoding"),
    (b"<!-- a comment -->\n<!DOCTYPE ccidbridge [<!ENTITY a 'b'>]>\n<ccidbridge/>", 2,
     "refused"),
    (b"<?xml version='1.0'?>\n<!-- <ccidbridge> -->\n<?pi x?>\n<!DOCTYPE ccidbridge SYSTEM "
     b"'file:///etc/passwd'>\n<ccidbridge/>", 4, "refused"),
    ("<!DOCTYPE a [<!ENTITY b 'c'>]><ccidbridge>&b;</ccidbridge>".encode("utf-16"), 1,
     "refused"),  # no "<!DOCTYPE" bytes for a pattern to find
    (b"<ccidbridge><![CDATA[<!DOCTYPE x [<!ENTITY a 'b'>]>]]></ccidbridge>", 1, "holds text"),
])
def test_hostile_bytes(tmp_path: Path, data: bytes, line: int, words: str) -> None:
    err = _error(data)  # type: ignore[arg-type]
    assert str(err).startswith(f"vm.xml:{line}: ") and words in str(err), str(err)
    assert "\n" not in str(err)
    path = tmp_path / "hostile.xml"
    path.write_bytes(data)
    _refused(path, f"{path}:{line}: ", words)


def test_doctype_words_in_comments_and_cdata_are_not_a_doctype() -> None:
    config = loads(b"<!-- <!DOCTYPE x> <!ENTITY y 'z'> -->\n<ccidbridge>\n<!-- <!DOCTYPE -->"
                   b"<smartcard mode='host'/></ccidbridge>", "vm.xml")
    assert config.unserved()[0][0] == "vm.xml:3 smartcard0"


def test_many_elements_on_one_line_stay_linear() -> None:
    """One long line of elements (each line lookup memoized per tag and line)."""
    cards = "<controller type='ccid'/>" * 20_000
    with pytest.raises(ConfigError) as info:
        loads(f"<ccidbridge>{cards}<!-- {'x' * 400_000} --><bogus/></ccidbridge>", "vm.xml")
    assert str(info.value).startswith("vm.xml:1: unexpected <bogus>"), info.value


# ------------------------------------------------------------------------------ the CLI itself


def test_unknown_command_is_a_usage_error() -> None:
    done = _cli("bogus", "x.xml")
    assert done.returncode == 2 and "invalid choice: 'bogus'" in done.stderr, done
    assert "Traceback" not in done.stderr


def test_import_error_inside_a_command_surfaces(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A command module whose own import fails is a bug to show, not a command to hide."""
    (tmp_path / "broken_command.py").write_text("import no_such_module_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "COMMANDS", (*cli.COMMANDS, "broken_command"))
    with pytest.raises(ModuleNotFoundError, match="no_such_module_anywhere"):
        cli.build_parser()


def test_a_unix_socket_path_longer_than_the_kernel_takes_is_an_error(tmp_path) -> None:
    """sun_path holds 107 bytes and a NUL: a longer path is listened on nowhere."""
    fits = "/run/" + "s" * (107 - len("/run/"))
    config = ("<ccidbridge>\n<smartcard mode='passthrough' type='unix'>\n"
              "<source mode='bind' path='{}'/>\n</smartcard>\n</ccidbridge>\n")
    assert loads(config.format(fits), "vm.xml").served_cards()
    with pytest.raises(ConfigError) as info:
        loads(config.format(fits + "x"), "vm.xml")
    assert str(info.value).startswith("vm.xml:3: ") and "at most 107" in str(info.value)
