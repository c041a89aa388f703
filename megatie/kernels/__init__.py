"""Copy kernels used when block weights (and their optimizer state) are replicated."""

from megatie.kernels.copy import multi_tensor_copy_

__all__ = ["multi_tensor_copy_"]
