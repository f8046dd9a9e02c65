"""The card side of the bridge: where APDUs go and card events come from.

- ``base``     the interface the bridge's APDU thread drives (and its reports)
- ``pcsc``     that interface over pyscard/pcsc-lite, one card for one ``<reader>``
- ``choice``   which reader's card to serve (sans-IO)
- ``monitor``  the thread that watches readers and feeds the choice
- ``listing``  every reader with its card state (``ccidbridge readers``, the lab)
- ``errors``   PC/SC result codes: names, and what each says about the card
"""
