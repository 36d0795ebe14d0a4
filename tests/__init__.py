"""megaswift's tests: unit/ (one process), dist/ (gloo process groups), e2e/ (the CLI as a user runs
it) and helpers/ (what they share). A package, so tests import `tests.helpers...` and two test files
may share a basename in different directories; pytest.ini puts the checkout on sys.path."""
