"""``python -m benchmarks.markdown [JSON]``: the result tables of docs/performance.md.

Renders a run's JSON (default ``benchmarks/results/latest.json``) as the
Markdown tables docs/performance.md shows, so the document's numbers come
from one run, unedited.  ``--splice FILE`` replaces the text between the
``<!-- results:begin -->`` and ``<!-- results:end -->`` markers in FILE.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.__main__ import RESULTS

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _f(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"


def _mp(s: dict) -> str:
    return f"{_f(s['median_us'])} / {_f(s['p99_us'])}"


def _span(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.2f}" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}–{hi:.2f}"


def summary(r: dict) -> list[str]:
    out = ["| # | what | target | result | |", "|---|---|---|---|---|"]
    if "apdu" in r:
        a = r["apdu"]
        pin = [v for k, v in a.items() if k.startswith("cpu")]
        free = [v for k, v in a.items() if k.startswith("free")]

        def span(rows: list[dict], key: str) -> str:
            return _span([x["ratios"][key] for x in rows]) if rows else "–"

        rows = pin + free

        def verdict(ok: bool, yes: str, no: str) -> str:
            return yes if ok else f"**{no}**"

        met = verdict(
            all(x["ratios"]["bridged/floor median"] <= 1.10 for x in rows), "met", "missed"
        )
        out.append(
            "| 1 | APDU round trip, bridged / floor (median) | ≤ 1.10 | "
            f"**{span(pin, 'bridged/floor median')}** pinned, "
            f"{span(free, 'bridged/floor median')} free | {met} |"
        )
        beat = verdict(
            all(x["ratios"]["bridged/direct median"] < 1.5 for x in rows), "beaten", "not beaten"
        )
        out.append(
            "| 1 | bridged / direct pyscard (median) | beat vscclient's 1.5–2.2 | "
            f"{span(pin, 'bridged/direct median')} pinned, "
            f"{span(free, 'bridged/direct median')} free | {beat} |"
        )
        beat = verdict(
            all(
                x["ratios"]["bridged/floor median"] < x["ratios"]["relay/floor median"]
                for x in rows
            ),
            "beaten",
            "not beaten",
        )
        out.append(
            "| 1 | bridged / floor vs minimal blocking relay / floor | beat the relay | relay "
            f"{span(pin, 'relay/floor median')} pinned, {span(free, 'relay/floor median')} free "
            f"| {beat} |"
        )
    if "overhead" in r:

        def added(mode: str) -> str:
            vals = [
                v["added_us"]["vs floor median"]
                for k, v in r["overhead"].items()
                if k.startswith("free") == (mode == "free")
            ]
            if not vals:
                return "–"
            return f"{min(vals):+.1f} to {max(vals):+.1f} µs"

        out.append(
            "| 2 | bridge-only cost, instant card (median over the card-less floor) | (report) | "
            f"{added('pinned')} pinned, {added('free')} free | |"
        )
    if "events" in r:
        e = [v for k, v in r["events"].items() if not k.startswith("quick")]
        med = max(x["median_us"] for x in e) / 1000
        mx = max(x["max_us"] for x in e) / 1000
        ok = "met" if mx <= 50 else "**missed**"
        out.append(
            "| 3 | card inserted → ATR frame, removed → CardRemove (after pcscd reports it) "
            f"| ≤ 50 ms | median ≤ {med:.1f} ms, max {mx:.1f} ms | {ok} |"
        )
    if "recovery" in r:
        rec = [v["QEMU listens -> ATR acked"] for v in r["recovery"].values()]
        mx = max(x["max_us"] for x in rec) / 1000
        meds = [x["median_us"] / 1000 for x in rec]
        ok = "met" if mx <= 1000 else "**missed**"
        out.append(
            "| 4 | QEMU killed and restarted → reconnected and ATR acked, after QEMU listens "
            f"| ≤ 1 s | median {min(meds):.0f}–{max(meds):.0f} ms, max {mx:.0f} ms | {ok} |"
        )
    if "memory" in r:
        m = r["memory"]
        ok = "met" if m["idle_mib"] <= 40 and m["growth_mib"] <= 1 else "**missed**"
        out.append(
            "| 5 | RSS idle / growth after 100k APDUs | ≤ 40 MB / ≤ 1 MB | "
            f"{m['idle_mib']:.1f} MiB / {m['growth_mib']:+.2f} MiB | {ok} |"
        )
    if "scale" in r:
        parts = [
            f"{v['p99 ratio']:.2f} ({v['cards']} "
            f"{'instant' if k.endswith('instant') else 'PC/SC'} cards, "
            f"{'free' if k.startswith('free') else 'pinned'})"
            for k, v in r["scale"].items()
        ]
        ok = all(v["p99 ratio"] <= 1.5 for v in r["scale"].values())
        out.append(
            "| 6 | p99 with N cards in one process / single-card p99 | ≤ 1.5 | "
            f"{', '.join(parts)} | {'met' if ok else '**missed**'} |"
        )
    if "codec" in r:
        c, f = r["codec"]["ccidbridge"], r["codec"]["struct (floor)"]
        out.append(
            f"| 7 | codec parse / build | (report) | {c['parse'] / 1e6:.2f} M / "
            f"{c['build'] / 1e6:.1f} M msg/s; {c['parse'] / f['parse']:.2f} / "
            f"{c['build'] / f['build']:.2f} of a bare `struct` codec | |"
        )
    return out


def apdu(r: dict) -> list[str]:
    names = ("bridged", "direct", "socket floor", "floor", "relay", "session relay")
    head = "| socket, card, scheduling | " + " | ".join(
        f"{n} median / p99" if n == "bridged" else n for n in names
    )
    head += (
        " | card on loop | in-process | bridged/direct | **bridged/floor** | relay/floor "
        "| session relay/floor | card on loop/floor |"
    )
    out = [head, "|" + "---|" * (len(names) + 8)]
    for label, res in r.items():
        mode, card, sock = label.split()
        st, q = res["stats"], res["ratios"]
        cells = [_mp(st[n]) for n in names]
        for extra in ("bridged, card on loop", "bridged in-process"):
            cells.append(_mp(st[extra]) if extra in st else "–")
        cells += [
            f"{q['bridged/direct median']:.2f} (p99 {q['bridged/direct p99']:.2f})",
            f"**{q['bridged/floor median']:.2f}** (p99 {q['bridged/floor p99']:.2f})",
            f"{q['relay/floor median']:.2f}",
            f"{q['session relay/floor median']:.2f}",
            f"{q['card on loop/floor median']:.2f}" if "card on loop/floor median" in q else "–",
        ]
        where = (
            f"{sock}, {'vpcd card' if card == 'vpcd' else card}, "
            f"{'pinned' if mode != 'free' else 'free'}"
        )
        out.append(f"| {where} | " + " | ".join(cells) + " |")
    return out


def overhead(r: dict) -> list[str]:
    out = [
        "| socket, scheduling | instant bridge median / p99 µs | floor | echo | instant/floor "
        "| instant/echo | added vs floor (medians) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, res in r.items():
        mode, sock = label.split()
        st, q, a = res["stats"], res["ratios"], res["added_us"]
        out.append(
            f"| {sock}, {'pinned' if mode != 'free' else 'free'} | {_mp(st['instant bridge'])} "
            f"| {_mp(st['floor'])} | {_mp(st['echo'])} "
            f"| {q['instant/floor median']:.2f} (p99 {q['instant/floor p99']:.2f}) "
            f"| {q['instant/echo median']:.2f} | +{a['vs floor median']:.1f} µs |"
        )
    return out


def events(r: dict) -> list[str]:
    out = ["| | median | p90 | max | target |", "|---|---|---|---|---|"]
    for name, s in r.items():
        if name.startswith("quick"):
            verdict = f"not judged: R10 holds the ATR {s.get('pause_s', 0.5):g} s after a removal"
        else:
            verdict = "≤ 50 ms: " + ("met" if s["max_us"] <= 50_000 else "**missed**")
        what = (
            name.replace("quick re-insert ->", "re-inserted at once →")
            .replace(" (R10 hold)", "")
            .replace("insert ->", "inserted →")
            .replace("remove ->", "removed →")
        )
        out.append(
            f"| {what} on the socket | {s['median_us'] / 1000:.2f} ms "
            f"| {s['p90_us'] / 1000:.2f} ms | {s['max_us'] / 1000:.2f} ms | {verdict} |"
        )
    return out


def recovery(r: dict) -> list[str]:
    out = ["| socket | median | max | per cycle (down s: ms) |", "|---|---|---|---|"]
    for sock, res in r.items():
        s = res["QEMU listens -> ATR acked"]
        cycles = ", ".join(
            f"{c['down_s']:.1f}: {c['listen_to_acked_ms']:.0f}" for c in res.get("cycles", [])
        )
        out.append(
            f"| {sock} | {s['median_us'] / 1000:.0f} ms | {s['max_us'] / 1000:.0f} ms | {cycles} |"
        )
    return out


def memory(r: dict) -> list[str]:
    end = next(k for k in r if k.startswith("after_") and k != "after_10k_mib")
    return [
        f"| idle, after the handshake | after 10k APDUs | after {end[6:-4]} APDUs | growth "
        "| growth 10k → end | APDU/s |",
        "|---|---|---|---|---|---|",
        f"| {r['idle_mib']:.1f} MiB | {r['after_10k_mib']:.1f} MiB | {r[end]:.1f} MiB "
        f"| {r['growth_mib']:+.2f} MiB | {r['growth_10k_to_end_mib']:+.2f} MiB "
        f"| {r['apdu_per_s']:,.0f} |",
    ]


def scale(r: dict) -> list[str]:
    out = [
        "| cards | 1 card median / p99 µs | N cards round robin | p99 N/1 "
        "| p99 N/1 per round, median | median N/1 "
        "| all N busy at once: total APDU/s vs one card |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, res in r.items():
        b = res["busy"]
        mode, card = kind.split() if " " in kind else ("free", kind)
        what = (
            f"{res['cards']} {'instant cards' if card == 'instant' else 'PC/SC cards (vpcd)'}, "
            f"{'free' if mode == 'free' else 'pinned'}"
        )
        out.append(
            f"| {what} | {_mp(res['1 card'])} | {_mp(res['n cards'])} "
            f"| **{res['p99 ratio']:.2f}** "
            f"| {res.get('p99 ratio, median of rounds', float('nan')):.2f} "
            f"| {res['median ratio']:.2f} "
            f"| {b['all at once APDU/s']:,.0f} vs {b['single APDU/s']:,.0f} "
            f"({b['throughput ratio']:.1f}x; per-APDU p99 {_f(b['per-APDU']['p99_us'], 0)} µs) |"
        )
    return out


def codec(r: dict) -> list[str]:
    f = r["struct (floor)"]
    out = [
        "| codec | parse msg/s | build msg/s | parse / struct | build / struct |",
        "|---|---|---|---|---|",
    ]
    for name, c in r.items():
        out.append(
            f"| {name} | {c['parse']:,.0f} | {c['build']:,.0f} "
            f"| {c['parse'] / f['parse']:.2f} | {c['build'] / f['build']:.2f} |"
        )
    return out


SECTIONS = {
    "apdu": ("1. APDU round trip (µs; floor = direct + socket floor, per sample)", apdu),
    "overhead": ("2. Bridge-only overhead (instant card behind the card-side interface)", overhead),
    "events": ("3. Card events (after pcscd reports the change)", events),
    "recovery": ("4. Recovery: QEMU listens again → ATR acked", recovery),
    "memory": ("5. Memory (VmRSS of the bridge process)", memory),
    "scale": ("6. Scale (N cards in one bridge process)", scale),
    "codec": ("7. Codec", codec),
}


def render(run: dict) -> str:
    r = run["results"]
    m = run["machine"]
    lines = [
        f"Run of {run['started']} on {m['cpu']} x{m['cpus']}, {m['mem_gib']} GiB, {m['os']}, "
        f"kernel {m['kernel']}, Python {m['python']}, pyscard {m['pyscard']}, pcscd {m['pcscd']}, "
        f"vpcd {m['vsmartcard-vpcd']}, QEMU {m['qemu']}; load average "
        f"{m['loadavg'][0]:.2f} at the start.",
        "",
        "#### Summary",
        "",
        *summary(r),
    ]
    for key, (title, fn) in SECTIONS.items():
        if key in r and "error" not in r[key]:
            lines += ["", f"#### {title}", "", *fn(r[key])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.markdown")
    p.add_argument("json", nargs="?", type=Path, default=RESULTS)
    p.add_argument("--splice", type=Path, help="replace the results block in this file")
    args = p.parse_args(argv)
    text = render(json.loads(args.json.read_text()))
    if args.splice is None:
        sys.stdout.write(text)
        return 0
    doc = args.splice.read_text()
    a, b = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    args.splice.write_text(doc[:a] + "\n" + text + doc[b:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
