"""The backend registry: importing grpo.backends imports no backend, a backend's module is imported only when
it is made, and an unknown name gets the registry's error."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from grpo.backends import BACKENDS, backend_options, make_backend, select_backend

ROOT = Path(__file__).resolve().parents[1]


def modules_after(code: str) -> dict[str, bool]:
    """Which of the heavy modules a fresh interpreter holds after running `code`."""
    probe = ("import json, sys\n" + code + "\n"
             "names = ['vllm', 'transformers', 'grpo.backends.hf', 'grpo.backends.vllm_backend', 'pipeline.generate']\n"
             "print(json.dumps({n: n in sys.modules for n in names}))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_package_imports_no_backend():
    loaded = modules_after("import grpo.backends")
    assert not any(loaded.values()), f"import grpo.backends loaded {[n for n, v in loaded.items() if v]}"


def test_an_unknown_backend_gets_the_registry_error_and_imports_nothing():
    loaded = modules_after(
        "from grpo.backends import make_backend\n"
        "try:\n"
        "    make_backend('nope', 'unused')\n"
        "except ValueError as e:\n"
        "    assert str(e) == \"unknown rollout backend 'nope'; allowed: hf, vllm\", str(e)\n"
        "else:\n"
        "    raise SystemExit('no error')")
    assert not any(loaded.values()), loaded
    with pytest.raises(ValueError, match=r"unknown rollout backend 'nope'; allowed: hf, vllm"):
        make_backend("nope", "unused")
    with pytest.raises(ValueError, match=r"unknown rollout backend 'nope'"):
        backend_options(SimpleNamespace(), "nope")


def test_the_evaluate_stage_does_not_import_the_generate_stage():
    assert modules_after("import pipeline.evaluate")["pipeline.generate"] is False


@pytest.mark.parametrize("name", BACKENDS.names())
def test_each_entry_names_a_module_that_defines_its_backend(name):
    # read from the source, not imported: importing the module is make_backend's job
    entry = BACKENDS.get(name)
    spec = importlib.util.find_spec(entry.module)
    assert spec is not None and spec.origin, f"{name}: no module {entry.module}"
    tree = ast.parse(Path(spec.origin).read_text())
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    assert entry.cls in classes, f"{name}: {entry.module} defines no class {entry.cls}"
    names = [stmt.value.value for stmt in classes[entry.cls].body if isinstance(stmt, ast.Assign)
             and [getattr(t, "id", None) for t in stmt.targets] == ["name"] and isinstance(stmt.value, ast.Constant)]
    assert names == [name], f"{entry.module}.{entry.cls}.name is {names}, registered as {name!r}"


def test_every_backend_module_is_named_in_an_import_statement_for_the_dependency_scans():
    # make_backend imports by module name, which the static scans (tests/test_stage_deps.py) cannot follow
    tree = ast.parse((ROOT / "grpo/backends/__init__.py").read_text())
    declared = {f"{node.module}.{alias.name}" for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module == "grpo.backends" for alias in node.names}
    assert declared == {BACKENDS.get(name).module for name in BACKENDS.names()}


def test_backend_options_come_from_params():
    vllm = SimpleNamespace(dtype="auto", max_model_len=1024, gpu_memory_utilization=0.5, tensor_parallel_size=1,
                           data_parallel_size=2, enforce_eager=True, unrelated=3)
    params = SimpleNamespace(rollout=SimpleNamespace(vllm=vllm))
    assert backend_options(params, "hf") == {}
    assert backend_options(params, "vllm") == dict(dtype="auto", max_model_len=1024, gpu_memory_utilization=0.5,
                                                   tensor_parallel_size=1, data_parallel_size=2,
                                                   enforce_eager=True)


def test_select_backend_passes_an_explicit_name_through():
    assert select_backend("hf") == "hf"
    assert select_backend("vllm") == "vllm"
    assert select_backend("auto") in BACKENDS


def test_make_backend_imports_the_chosen_module_and_builds_its_class():
    class Model:
        def eval(self):
            return self

    model, tokenizer = Model(), SimpleNamespace()
    backend = make_backend("hf", "unused", model=model, tokenizer=tokenizer, prompts_per_batch=3, dtype="float32")
    assert type(backend).__module__ == "grpo.backends.hf" and backend.name == "hf"
    assert (backend.model, backend.tokenizer, backend.prompts_per_batch) == (model, tokenizer, 3)
    assert tokenizer.padding_side == "left"


def test_data_parallel_shards_are_contiguous_and_cover_every_prompt():
    from grpo.backends.data_parallel import replica_devices, shard_bounds

    for n in range(0, 12):
        for parts in range(1, 5):
            bounds = shard_bounds(n, parts)
            assert len(bounds) == parts and bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [stop - start for start, stop in bounds]
            assert max(sizes) - min(sizes) <= 1
    assert [replica_devices(d, 2) for d in range(3)] == ["0,1", "2,3", "4,5"]


@pytest.mark.slow
def test_a_replica_that_fails_to_start_is_reported_and_nothing_is_left_running(tmp_path):
    import psutil

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(RuntimeError, match=r"rollout replica \d failed:(.|\n)*(OSError|Error)"):
        make_backend("hf", str(tmp_path / "no-such-model"), data_parallel_size=2)
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(p.cmdline())]
    assert not left, left


def test_inverse_cdf_sampling_draws_each_token_with_its_probability():
    from grpo.backends.hf import _inverse_cdf_sample

    n = 200_000
    # unnormalised rows (as float32 softmax outputs are), zero-probability tokens among them, one certain token
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3001, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0]]).repeat(n, 1)
    torch.manual_seed(0)
    drawn = _inverse_cdf_sample(probs).view(n, 2)
    frequency = torch.bincount(drawn[:, 0], minlength=5).double() / n
    expected = probs[0].double() / probs[0].double().sum()
    assert torch.allclose(frequency, expected, atol=0.006), frequency  # 5 standard deviations at p = 0.6
    assert frequency[1] == 0 and frequency[4] == 0
    assert (drawn[:, 1] == 3).all()
