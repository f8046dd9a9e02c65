"""The card side of the bridge: where APDUs go and card events come from.

``base`` defines the interface the runtime drives; ``pcsc`` implements it
over pyscard/pcsc-lite; ``instant`` is a card that answers at once (for
measuring the bridge itself).
"""
