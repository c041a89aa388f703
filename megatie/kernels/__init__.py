"""Copy kernels used when block weights (and their optimizer state) are replicated."""

from megatie.kernels.copy import AUTO_TRITON_MIN_BYTES, CopyPlan, multi_tensor_copy_

__all__ = ["AUTO_TRITON_MIN_BYTES", "CopyPlan", "multi_tensor_copy_"]
