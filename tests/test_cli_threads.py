"""The library's thread switch (diffusion_lab.set_threads / diffusion_lab.threads) that the CLI uses, and the
sampler registry's import structure (langevin registers its methods where the package assembles them)."""
import ast
import pathlib
import subprocess
import sys

import pytest
import torch

import diffusion_lab

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_set_threads_sets_and_returns_the_previous_count():
    before = torch.get_num_threads()
    try:
        assert diffusion_lab.set_threads(2) == before
        assert torch.get_num_threads() == 2
        assert diffusion_lab.set_threads(1) == 2
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_threads_context_restores_the_count_also_after_an_exception():
    before = torch.get_num_threads()
    target = 2 if before != 2 else 3
    with diffusion_lab.threads(target) as n:
        assert n == target and torch.get_num_threads() == target
    assert torch.get_num_threads() == before
    with pytest.raises(KeyError):
        with diffusion_lab.threads(target):
            raise KeyError("inside")
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_thread_counts_are_refused_with_the_value(bad):
    before = torch.get_num_threads()
    with pytest.raises(ValueError, match="integer >= 1"):
        diffusion_lab.set_threads(bad)
    assert torch.get_num_threads() == before


def test_threads_are_exported():
    assert {"set_threads", "threads"} <= set(diffusion_lab.__all__)


def _imports(path: pathlib.Path) -> set:
    """Module names a file imports (relative ones as written, e.g. '..langevin' -> 'langevin')."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_the_registry_does_not_import_langevin():
    base = _imports(ROOT / "diffusion_lab" / "samplers" / "base.py")
    assert not any("langevin" in n for n in base), base
    assert any("samplers.base" in n for n in _imports(ROOT / "diffusion_lab" / "langevin.py"))


@pytest.mark.parametrize("first", ["diffusion_lab.samplers.base", "diffusion_lab.langevin"])
def test_langevin_methods_are_registered_whichever_module_is_imported_first(first):
    code = (f"import importlib; importlib.import_module({first!r}); "
            "from diffusion_lab.samplers import available, get_method; "
            "names = [m.name for m in available()]; "
            "assert 'pc' in names and 'annealed_langevin' in names, names; "
            "assert get_method('pc').family == 'langevin'; print(len(names))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == len(diffusion_lab.available())


def test_the_threads_benchmark_alternates_sides_and_restores_the_count(tmp_path, monkeypatch, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("threads_bench", ROOT / "benchmarks" / "threads.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    seen = []
    before = torch.get_num_threads()
    m = bench.measure(lambda: seen.append(torch.get_num_threads()), threads=2, repeats=4)
    # one warm-up per side, then the order flips on every repeat: 1 2 | 1 2, 2 1, 1 2, 2 1
    assert seen == [1, 2, 1, 2, 2, 1, 1, 2, 2, 1]
    assert len(m["all_1"]) == len(m["all_n"]) == 4 and m["ratio_n_over_1"] == m["seconds_n"] / m["seconds_1"]
    assert torch.get_num_threads() == before
    # the command: a table and the JSON, on one tiny workload
    monkeypatch.setattr(bench, "workloads", lambda quick: [("noop", 1, lambda: None)])
    assert bench.main(["--threads", "2", "--repeats", "2", "--json", str(tmp_path / "t.json")]) == 0
    import json

    doc = json.loads((tmp_path / "t.json").read_text())
    assert [r["workload"] for r in doc["rows"]] == ["noop"] and doc["threads"] == 2
    assert "t_N / t_1" in capsys.readouterr().out
