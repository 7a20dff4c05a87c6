"""The network layer: the only part of pgwarden that imports asyncio."""
