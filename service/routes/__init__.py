"""HTTP routes, one module per concern, and the dependencies they share (``deps``)."""
