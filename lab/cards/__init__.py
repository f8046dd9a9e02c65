"""ccidbridge's own test cards on vsmartcard's vpcd, with real crypto (``cryptography``).

* :mod:`lab.cards.openpgp` — an OpenPGP 3.4 card, YubiKey-5-style (T=1,
  extended Lc/Le, command chaining, RSA-2048 keys).
* :mod:`lab.cards.piv` — a PIV card (ECC P-256 key in slot 9A, its X.509
  certificate longer than 256 bytes).
* :mod:`lab.cards.strict_t1` — a T=1 card that returns data only when Le is
  present and never answers 61xx.

Each card's logic is sans-IO (:class:`lab.cards.apdu.Applet`: C-APDU in,
R-APDU out); :mod:`lab.cards.vpcd` runs any of them on a vpcd slot, on a
thread or as ``python -m lab.cards.NAME --port P``.  Key material:
:mod:`lab.cards.keys`.  :mod:`lab.cards.slot` puts a card into a slot of the
lab's pcscd and waits until pcscd sees it; :mod:`lab.cards.gnupg` is a private
GnuPG home (scdaemon over pcscd) for driving and checking the OpenPGP card.
"""
