"""readapt's test suite, a package so that its helpers import by name: `from tests.tiny import save_tiny`
(tiny Hugging Face checkpoints built at test time); the shared fixtures are in tests/conftest.py."""
