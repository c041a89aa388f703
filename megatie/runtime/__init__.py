"""The process around a run: ranks agreeing (``distributed``), signals ending a run at a step boundary
(``interrupts``), one run per directory (``runlock``) and writes that never leave a half file
(``atomic``)."""
