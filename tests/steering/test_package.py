"""The steering package's face: its exports resolve lazily to the defining modules, its configs
load without the heavy libraries, and the old import paths and names keep working."""



def test_old_import_paths_still_work():
    from saeflow.steering import config, edits, schema, sweep_tables, typical
    from saeflow.steering.generate import MAX_NEW_TOKENS, SamplingConfig
    from saeflow.steering.plans import (
        MODES,
        PLAN_FORMAT,
        CallScope,
        PlanSchema,
        plan_edits,
        special_token_ids,
        typical_activations,
    )
    from saeflow.steering.sweep import MODES as SWEEP_MODES
    from saeflow.steering.sweep import SweepConfig, best_settings, sweep_profile

    assert SamplingConfig is config.SamplingConfig and MAX_NEW_TOKENS == config.MAX_NEW_TOKENS
    assert SweepConfig is config.SweepConfig and sweep_profile is config.sweep_profile
    assert MODES == schema.OPS == ("add", "rescale") and PLAN_FORMAT == schema.PLAN_FORMAT
    assert PlanSchema is schema.PlanSchema and CallScope is edits.CallScope
    assert plan_edits is edits.plan_edits and special_token_ids is edits.special_token_ids
    assert typical_activations is typical.typical_activations
    assert SWEEP_MODES == config.SWEEP_GRAPH_MODES and best_settings is sweep_tables.best_settings


def test_a_plans_op_is_its_json_mode():
    import networkx as nx

    from saeflow.steering.plans import Intervention, SteeringPlan, plan_from_graph

    plan = SteeringPlan("rescale", [Intervention(2, "resid_post", 5, 0.0)])
    assert plan.op == plan.mode == "rescale" and plan.to_dict()["mode"] == "rescale"
    assert SteeringPlan.from_dict(plan.to_dict()) == plan
    G = nx.DiGraph(seed="1/resid_post/3")
    G.add_node("1/resid_post/3", layer=1, position="resid_post", feature=3, role="seed")
    assert plan_from_graph(G, 2.0, "span", op="rescale").op == "rescale"
    assert plan_from_graph(G, 2.0, "span", mode="rescale").op == "rescale"  # the old keyword
    assert plan.slots() == [("resid_post", 2)] and str(plan.slots()[0]) == "2/resid_post"
