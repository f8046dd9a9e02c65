"""The bridge runtime: the IO around the sans-IO session.

- ``transport``  non-blocking sockets: connect to QEMU (with backoff) or listen for it
- ``bridge``     one served card: its APDU thread (session + socket + card) and watchdog
- ``service``    every card of every config in one process, signals, restarts, shutdown
- ``apdulog``    what may be logged about an APDU (never PIN data)
"""
