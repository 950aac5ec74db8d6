"""readapt's version: modules that need it import it from here, never from the package."""

__version__ = "0.1.0"
