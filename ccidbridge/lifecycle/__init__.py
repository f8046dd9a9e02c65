"""The bridge's lifecycle around a VM: hot attach/detach, the libvirt hook, the
systemd unit and ``doctor`` (docs/lifecycle.md)."""
