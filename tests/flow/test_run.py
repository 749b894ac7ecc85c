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


def test_the_former_module_still_offers_every_name():
    """`from saeflow.flow.predecessors import X` keeps working for the names callers used."""
    import saeflow.flow.predecessors as old
    from saeflow.flow import compute, config, inputs, run, thresholds

    assert old.run_flow is compute.run_flow and old.compute_layer is compute.compute_layer
    assert old.FlowConfig is config.FlowConfig and old.FlowRun is run.FlowRun
    assert old.open_flow is run.open_flow and old.slot_directions is inputs.slot_directions
    assert old.plan_layers is inputs.layer_slots and old.LayerPlan is inputs.LayerSlots
    assert old.resolve_geometry is thresholds.resolve_geometry


def test_flow_config_and_the_package_import_light():
    """The command line reads FlowConfig: importing it (or the package) loads no compute."""
    import subprocess
    import sys

    code = ("import sys, saeflow.flow, saeflow.flow.config; "
            "print(sorted(m for m in ('saeflow.flow.compute', 'saeflow.flow.match', "
            "'saeflow.flow.run', 'pandas', 'networkx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    from saeflow.flow import FlowConfig, open_flow  # the lazy names resolve

    assert FlowConfig().k == 5 and open_flow.__module__ == "saeflow.flow.run"
