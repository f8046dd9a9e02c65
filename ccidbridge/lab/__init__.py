"""The lab: a throwaway host stack (pcscd + vpcd, virtual cards, QEMU, a tiny
guest) started by the tests, the demo and the benchmarks.  Never imported by
the bridge itself."""
