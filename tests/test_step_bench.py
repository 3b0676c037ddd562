"""benchmarks/bench_step.py as the CPU smoke test CI runs: every CPU variant runs from the same
weights and batches, their first-step losses agree with the reference's, the real loader phase
runs, the JSON holds every figure. (No timing is asserted: this is not a benchmark run.)"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_step  # noqa: E402


def test_bench_step_cpu_smoke(tmp_path, capsys):
    out = tmp_path / "step.json"
    assert bench_step.main(["--device", "cpu", "--steps", "2", "--warmup", "1", "--loader-steps", "1",
                            "--loader-backend", "reference", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    names = [r["variant"] for r in report["results"]]
    assert names == bench_step.CPU_ORDER and not report["notes"]
    assert report["flops_per_step"] > 0
    for r in report["results"]:
        assert r["ms_per_step"] > 0 and len(r["ms_all"]) == 2 and r["stages_ms"]
        # fp32 variants compute the reference's objective to rounding; bf16 views round the pixels.
        assert r["max_rel_diff_first_losses"] < (1e-2 if r["variant"] == "+bf16-views" else 1e-5), r
    packed = next(r for r in report["results"] if r["variant"] == "+packed")
    assert "encoder, 3 groups packed" in packed["stages_ms"]
    assert "encoder: masked views" in report["results"][0]["stages_ms"]
    assert report["loader"] and "error" not in report["loader"] and report["loader"]["steps"] == 1
    text = capsys.readouterr().out
    assert "| reference |" in text and "real loader" in text
