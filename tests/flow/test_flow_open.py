"""Opening a flow result: absent (not computed yet) and corrupt are told apart."""
import json

import pytest

from saeflow.errors import FlowError, MissingResultError
from saeflow.flow.predecessors import open_flow


def test_absent_flow_is_missing_result(tmp_path):
    with pytest.raises(MissingResultError, match="holds no flow results"):
        open_flow(tmp_path)
    with pytest.raises(MissingResultError):
        open_flow(tmp_path / "never_made")


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", json.dumps({"format": "other"})])
def test_corrupt_or_foreign_manifest_is_a_flow_error(tmp_path, text):
    (tmp_path / "flow.json").write_text(text)
    with pytest.raises(FlowError) as e:
        open_flow(tmp_path)
    assert not isinstance(e.value, MissingResultError)


def test_manifest_without_thresholds_is_a_flow_error(tmp_path):
    (tmp_path / "flow.json").write_text(json.dumps({"format": "saeflow-flow"}))
    with pytest.raises(FlowError) as e:
        open_flow(tmp_path)
    assert not isinstance(e.value, MissingResultError)
