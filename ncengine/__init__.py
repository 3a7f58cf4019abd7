"""ncengine: the Neural Collapse science core (metrics, bounds, training). No web or DB imports."""

__version__ = "0.1.0"
