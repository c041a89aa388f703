"""Dynamic layer tying: the tie map's algebra (``tie_map``), binding blocks' parameters to their
group's root (``layers``), the policies that decide the tie map (``policies``, the Q-learning
``agent``, ``gradient_probe`` for ``split``), and the ``controller`` that applies a decision every k
steps. ``options`` names the choices as plain data, for the launchers' parsers."""
