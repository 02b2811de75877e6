"""The error type of fusion."""

__all__ = ["FusionError"]


class FusionError(ValueError):
    """Fusion cannot proceed. The message names the layer and says what to do.

    Attributes:
        layer: the qualified name of the layer at fault (from ``named_modules()``),
            or ``None`` when the problem is not one layer's.
        code: a short machine-readable code, e.g. ``"nonfinite"`` or ``"verify"``.
    """

    def __init__(self, message, layer=None, code=None):
        super().__init__(message)
        self.layer = layer
        self.code = code
