"""The VSCard protocol core: wire codec, streaming decoder, sans-IO sessions.

Nothing in this package does IO, starts threads or reads a clock.

- ``wire``      the frames, declared with construct as in libcacard's vscard_common.h
- ``errors``    one exception per way a frame can be wrong
- ``decoder``   the streaming frame decoder (arbitrary chunks in, whole frames out)
- ``messages``  the nine message types as small immutable classes, encode/decode
- ``qemu``      everything QEMU 7.2's usb-ccid/ccid-card-passthru imposes, in one place
- ``atr``       ATR parsing, QEMU's ATR check, the T=0 rewrite
- ``chaining``  serving card responses longer than QEMU's cap with 61xx + GET RESPONSE
- ``t1``        recognising a T=1 block from a guest that negotiated T=1 (refused)
- ``events``    the events a session takes and gives
- ``session``   the bridge side (the "client" in vscard_common.h terms)
- ``gate``      what stands between the guest and the card: ``policy`` (allow/deny
                rules), ``guard`` (the PIN-retry guard), ``selection`` (the selected
                application per logical channel)
- ``device``    QEMU's side (the "host"), a twin for tests
"""
