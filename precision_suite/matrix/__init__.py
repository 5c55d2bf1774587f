"""The default matrix as tests: ``pytest --pyargs precision_suite.matrix`` (see ``test_default_matrix``)."""
