"""What a user runs: the launchers' command line (``train_cli``), the ``megatie`` command
(``command``: export, eval, generate, finetune) and what it calls (``export``, ``inference``,
``finetune``)."""
