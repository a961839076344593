"""relayd: one HTTP producer stream relayed to N receivers at line speed."""

__version__ = "0.1.0"
