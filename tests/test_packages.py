"""Every package's face: its lazy exports resolve to the modules that define them, and importing
the packages and every config module (what the command line reads) loads nothing heavy."""
import importlib
import subprocess
import sys

import pytest

PACKAGES = ["saeflow", "saeflow.lm", "saeflow.saes", "saeflow.scale", "saeflow.flow",
            "saeflow.features", "saeflow.evolution", "saeflow.steering", "saeflow.pipeline",
            "saeflow.app"]
CONFIG_MODULES = ["saeflow.configs", "saeflow.ids", "saeflow.llm", "saeflow.lm.corpus_spec",
                  "saeflow.saes.pass_config", "saeflow.saes.train.config", "saeflow.flow.config",
                  "saeflow.features.config", "saeflow.features.explain_config",
                  "saeflow.evolution.config", "saeflow.steering.config",
                  "saeflow.steering.validate_config", "saeflow.pipeline.config"]
HEAVY = ("torch", "numpy", "pandas", "networkx", "pyarrow", "duckdb", "matplotlib", "fastapi",
         "transformers", "pydantic")


@pytest.mark.parametrize("package", PACKAGES)
def test_every_export_is_the_defining_modules_object(package):
    pkg = importlib.import_module(package)
    names = [n for n in pkg.__all__ if n != "__version__"]
    assert names
    for name in names:
        value = getattr(pkg, name)
        assert name in dir(pkg)
        home = getattr(value, "__module__", None)
        if home and home.startswith("saeflow"):  # classes and functions name their module
            assert getattr(importlib.import_module(home), name, value) is value
    with pytest.raises(AttributeError):
        getattr(pkg, "no_such_name")


def test_packages_and_configs_import_nothing_heavy():
    code = ("import importlib, sys\n"
            f"for m in {PACKAGES + CONFIG_MODULES!r}: importlib.import_module(m)\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
