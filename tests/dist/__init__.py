"""Multi-process tests on gloo (megaswift.testing.dist)."""
