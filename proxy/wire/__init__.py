"""Sans-IO codec for PostgreSQL protocol v3.

Nothing in this package performs I/O or imports anything else from pgwarden.
Messages are decoded per direction (frontend = client to server, backend =
server to client) because the same type byte means different things each way.
"""
