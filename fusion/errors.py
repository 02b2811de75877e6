"""The error type of fusion, and the table of its codes."""

__all__ = ["FusionError", "ERRORS"]

#: ``FusionError.code``: what went wrong. Each code is listed in the README.
ERRORS = {
    # the model's state or structure
    "shape": "a norm's vectors or channel count disagree with each other or with "
    "its layer: the model cannot run as built",
    "nonfinite": "a weight, bias or statistic is NaN or infinite",
    "variance": "running_var + eps is not positive: the norm divides by zero",
    "overflow": "a fused value does not fit the dtype (fuse_conv_and_bn; fuse "
    "leaves such a pair instead)",
    "batch_statistics": "the norm normalises with batch statistics "
    "(track_running_stats=False; fuse_conv_and_bn)",
    "remainder": "the norm goes on after its affine map (an activation), which "
    "fuse_conv_and_bn's single layer would drop; use fuse()",
    "dtype": "a tensor's dtype is not float16, bfloat16, float32 or float64",
    "empty": "a zero-size layer",
    "sparse": "a sparse tensor",
    "quantized": "a quantized tensor: fuse the float model before quantizing",
    "meta": "a tensor on the meta device has no values",
    "tensor_subclass": "a FakeTensor or another tensor subclass, not a plain tensor",
    "device": "a tensor the core was handed is not in host memory",
    "bounds": "a tensor view reaches outside its storage",
    "overlap": "a tensor to be written reaches one element through several indices",
    "argument": "an argument the C core cannot take",
    "nomem": "out of memory",
    # the run
    "example_inputs": "the forward failed on example_inputs",
    "changed": "a tensor changed while fuse() ran; nothing was written",
    "copy": "the model cannot be copied: fuse it in place",
    "verify": "verification failed, or verify=True without example_inputs",
    "strict": "strict=True and norms would be left",
    "rtol": "rtol is not a positive number",
    # plans and the command line
    "plan": "a plan does not fit the model it is applied to",
    "save": "the fused model could not be saved (fusion fuse)",
}


class FusionError(ValueError):
    """Fusion cannot proceed. The message names the layer and says what to do.

    Attributes:
        layer: the qualified name of the layer at fault (from ``named_modules()``),
            or ``None`` when the problem is not one layer's.
        code: a short machine-readable code from :data:`ERRORS`, e.g.
            ``"nonfinite"`` or ``"verify"``.
    """

    def __init__(self, message, layer=None, code=None):
        super().__init__(message)
        self.layer = layer
        self.code = code
