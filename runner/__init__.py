"""Framework-free core of the gradient runner: config -> plugin -> result -> record."""

__version__ = "0.1.0"
