"""Exception types of lora_fused.

Bad input raises an exception that is both the type a PyTorch user would catch for the same mistake on
``nn.Linear`` (``RuntimeError``) and the natural Python type (``ValueError`` for shapes and values,
``TypeError`` for dtypes), so ``except RuntimeError`` and ``except ValueError`` both work.
"""


class LoRAShapeError(ValueError, RuntimeError):
    """An input, weight or adapter has the wrong shape."""


class LoRADtypeError(TypeError, RuntimeError):
    """Tensors that must share a dtype or device do not."""


class BackendUnavailableError(RuntimeError):
    """A backend was named explicitly but cannot run here; the message says why."""
