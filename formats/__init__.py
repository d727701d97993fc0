"""The .lic container: reader, writer and specification (FORMAT.md)."""
