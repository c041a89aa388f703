"""What a run reports: the JSONL/TensorBoard ``logger``, the ``memory`` monitor, ``flops`` and MFU,
parked ``step_losses``, the run's ``summary`` and the paper's figures (``plots``)."""
