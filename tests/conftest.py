"""Every results payload the tests produce (run, merge, the plugin, hand-edited copies written back)
must follow the published schema: ``Results.to_dict`` validates its output for the whole session."""

import pytest

from precision_suite.results import Results
from precision_suite.validation import validate_results


@pytest.fixture(autouse=True, scope="session")
def results_follow_the_schema():
    to_dict = Results.to_dict

    def validated(self, encoded=None):
        payload = to_dict(self, encoded)
        validate_results(payload)
        return payload

    Results.to_dict = validated
    yield
    Results.to_dict = to_dict
