"""tests/gpu/check.sh on a machine without a GPU: what can be checked of the script before a GPU runs it.

CI has no GPU, so the sections themselves never run here. What does: the setup, the `preflight` section
(versions, every kimi module imported), its gate (no CUDA -> every later section recorded as skipped, not
run for minutes and failed one by one), the JSON that gathers the sections, and the archive of their logs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # ~15-30 s: the preflight imports every kimi module in a fresh interpreter
def test_without_a_gpu_preflight_fails_fast_and_skips_every_section(tmp_path):
    out_json = tmp_path / "check.json"
    env = {
        **os.environ,
        "PY": sys.executable,
        "SECTIONS_DIR": str(tmp_path / "sections"),
        "WHEELS": str(tmp_path / "no_wheels"),  # the repo's .whl/ (if any) holds wheels for the GPU's Python
        "CUDA_VISIBLE_DEVICES": "",
    }
    p = subprocess.run(
        ["bash", "tests/gpu/check.sh", str(out_json)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "preflight failed" in p.stdout, p.stdout

    report = json.loads(out_json.read_text())
    assert report["ok"] is False
    assert report["preflight"]["rc"] == 1
    assert "torch sees no CUDA device" in report["preflight"]["log_tail"]
    assert "every kimi module imports" in report["preflight"]["log_tail"]  # the imports ran before the CUDA check
    others = {k: v for k, v in report.items() if isinstance(v, dict) and k != "preflight"}
    assert {"train_nano", "throughput_8", "throughput_32", "ns", "compile", "fused_elementwise"} <= others.keys()
    for name, sec in others.items():  # every section the script has, not a copy of its list
        assert sec == {"rc": None, "seconds": 0, "skipped": "preflight failed"}, name

    with tarfile.open(tmp_path / "logs.tgz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"preflight.log", "preflight.status"} <= names
