"""The bridge runtime: the IO around the sans-IO session.

- ``transport``  asyncio sockets: connect to QEMU (with backoff) or listen for it
- ``bridge``     one served card: session + card side + connection
- ``service``    every card of every config in one process, signals, shutdown
- ``apdulog``    what may be logged about an APDU (never PIN data)
"""
