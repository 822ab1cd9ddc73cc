"""sherl-pipe: SHERL transfer learning as a two-stage feature-caching pipeline."""

__version__ = "0.1.0"
