"""ccidbridge: relay a host PC/SC smartcard into a QEMU/libvirt guest.

QEMU's ``usb-ccid`` + ``ccid-card-passthru`` devices speak libcacard's VSCard
protocol on a chardev; ccidbridge is the program on the other end.
"""

__version__ = "0.1.0"
