"""Stand-in for the ``google`` namespace package in Colab (tests only)."""
