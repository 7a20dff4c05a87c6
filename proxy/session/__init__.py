"""Session logic: phases, the extended-protocol pipeline, the upstream login.

Sans-IO like proxy.wire: these modules take bytes and events and produce bytes
to send and actions for the network layer; none of them imports asyncio.
"""
