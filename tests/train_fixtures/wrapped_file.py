"""A stand-in for a file that storage.open_for_write returns, for the fault-injection tests:
subclasses change ``write`` (a slow disk, a full one); everything else is the real file's."""

from __future__ import annotations


class WrappedFile:
    def __init__(self, f):
        self.f = f

    def write(self, b):
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()
