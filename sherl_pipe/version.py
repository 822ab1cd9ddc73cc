"""The package's version, in a module of its own: the cache writer records it in every manifest
without importing the package's face (__init__ and the API behind it)."""

__version__ = "0.1.0"
