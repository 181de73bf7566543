"""The package version, in the lowest layer: workers, remote agents and caches compare it, and
none of them should import the package root (which re-exports the whole API) to read it."""

__version__ = "0.1.0"
