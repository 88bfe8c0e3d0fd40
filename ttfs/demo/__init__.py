"""Demo and test helpers: the embedded HTTP origin used by ``make run`` and the test suite."""
