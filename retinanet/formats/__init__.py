"""Model file formats that export/ writes and runtime/ reads: shared below both."""
