"""The cluster model and its store: pure logic or store-only I/O (the bottom layer)."""
