"""One-process tests of the library, each against a reference (distributed paths against one process)."""
