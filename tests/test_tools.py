"""The measurement tools (deep_ep/tools) behind their launcher, the GPU batch scripts, and the rules the
command-line and measuring code keep: no import of ``deep_ep.cli`` from below it, no ``os.environ`` read
outside ``deep_ep.settings``, no reach into a Buffer's transport."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys

import pytest

from deep_ep import cli, tools

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: what this part of the tree owns: the command line, the benchmarks and tools, the scripts and examples
OWN = ["deep_ep/cli.py", "deep_ep/__main__.py", "deep_ep/bench", "deep_ep/tools", "benchmarks", "examples"]


def _py_files(paths):
    for p in paths:
        full = os.path.join(REPO, p)
        if full.endswith(".py"):
            yield full
        else:
            for root, _, files in os.walk(full):
                yield from (os.path.join(root, f) for f in sorted(files) if f.endswith(".py"))


def _env(**extra):
    return dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)


def test_tools_listed_and_each_one_starts(capsys):
    """``deep-ep tools`` lists every tool; each one imports and answers ``--help`` (so a renamed library
    name fails here, on CPU, not on the next GPU machine)."""
    assert cli.main(["tools"]) == 0
    listing = capsys.readouterr().out
    for name, (module, _, _) in tools.TOOLS.items():
        assert f"  {name} " in listing
        with pytest.raises(SystemExit) as exc:
            tools.main([name, "--help"], prog="deep-ep tools")
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: deep-ep tools {name}"), out
        assert os.path.exists(os.path.join(REPO, "deep_ep", "tools", module + ".py"))
    assert tools.main(["no-such-tool"]) == 2
    assert "unknown tool 'no-such-tool'" in capsys.readouterr().err
    # every module of the package is a listed tool (or the launcher itself)
    modules = {f[:-3] for f in os.listdir(os.path.join(REPO, "deep_ep", "tools")) if f.endswith(".py")}
    assert modules - {"__init__", "__main__"} == {m for m, _, _ in tools.TOOLS.values()}


def test_host_overhead_tool_on_cpu():
    """The CPU tool runs end to end through ``python -m deep_ep.tools`` (one rank, few calls)."""
    proc = subprocess.run(
        [sys.executable, "-m", "deep_ep.tools", "host-overhead", "--calls", "3", "--repeats", "1"],
        cwd=REPO,
        env=_env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for op in ("fresh dispatch", "layout only", "cached dispatch", "combine", "fresh+combine"):
        assert re.search(rf"^{re.escape(op)} +[0-9.]+ us/call .* aten ops", proc.stdout, flags=re.M), proc.stdout
    assert "metadata check on every call=False" in proc.stdout


def test_nothing_below_the_command_line_imports_it():
    """No module of deep_ep.bench or deep_ep.tools imports deep_ep.cli (the import circle is gone)."""
    for path in _py_files(["deep_ep/bench", "deep_ep/tools"]):
        tree = ast.parse(open(path).read(), path)
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            assert not any(n == "deep_ep.cli" or n.startswith("deep_ep.cli.") for n in names), (path, node.lineno)


def test_no_environment_reads_and_no_transport_access():
    """The command line, benchmarks, tools and examples read the environment only through deep_ep.settings
    (setting variables for child processes is fine), and nothing here touches a Buffer's ``_transport``."""
    for path in _py_files(OWN):
        src = open(path).read()
        assert "_transport" not in src, path
        for node in ast.walk(ast.parse(src, path)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                f = node.func
                if f.attr == "getenv" and isinstance(f.value, ast.Name) and f.value.id == "os":
                    pytest.fail(f"{path}:{node.lineno}: os.getenv")
                if f.attr == "get" and isinstance(f.value, ast.Attribute) and f.value.attr == "environ":
                    pytest.fail(f"{path}:{node.lineno}: os.environ.get")
            if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
                v = node.value
                if isinstance(v, ast.Attribute) and v.attr == "environ":
                    pytest.fail(f"{path}:{node.lineno}: os.environ[...] read")
            if isinstance(node, ast.Compare) and any(
                isinstance(c, ast.Attribute) and c.attr == "environ" for c in node.comparators
            ):
                pytest.fail(f"{path}:{node.lineno}: ... in os.environ")


def test_batch_scripts_name_what_exists():
    """scripts/*.sh call tools, benchmarks and subcommands that exist, and parse as bash."""
    for name in ("device_check.sh", "ab.sh"):
        path = os.path.join(REPO, "scripts", name)
        assert subprocess.run(["bash", "-n", path]).returncode == 0, name
        text = open(path).read()
        for ref in re.findall(r"(?:benchmarks|examples)/[\w./-]+\.py", text):
            assert os.path.exists(os.path.join(REPO, ref)), (name, ref)
        for tool in re.findall(r"deep_ep\.tools ([a-z][\w-]*)", text) + re.findall(r'TOOLS="([a-z][\w-]*)', text):
            assert tool in tools.TOOLS, (name, tool)
        for tool in re.findall(r";([a-z][\w-]*)[ \"]", text):
            if "TOOLS=" in text:
                assert tool in tools.TOOLS, (name, tool)
        assert "scripts/" not in re.sub(r"scripts/(ab|device_check)\.sh", "", text), name


def test_ab_script_runs_a_tool_against_a_base_tree(tmp_path):
    """scripts/ab.sh runs one command in a base tree and in this one, alternating; a base from before the
    tools package gets this tree's measuring code linked in."""
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    base = tmp_path / "base"
    shutil.copytree(
        os.path.join(REPO, "deep_ep"), base / "deep_ep", ignore=shutil.ignore_patterns("__pycache__", "tools")
    )
    os.remove(base / "deep_ep" / "bench" / "launch.py")  # as in a tree from before the tools package
    out = tmp_path / "out"
    cmd = ["bash", "scripts/ab.sh", str(base), "t", "1", sys.executable, "-m", "deep_ep.tools", "host-overhead"]
    cmd += ["--calls", "2", "--repeats", "1", "--check", "on"]
    proc = subprocess.run(
        cmd, cwd=REPO, env=_env(OUT=str(out), OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "== t base run 1 rc=0" in proc.stdout and "== t new run 1 rc=0" in proc.stdout, proc.stdout
    for v in ("base", "new"):
        assert "fresh dispatch" in (out / f"t_{v}_1.txt").read_text()
    assert (base / "deep_ep" / "tools").is_symlink() and (base / "deep_ep" / "bench" / "launch.py").is_symlink()


def _own_returns(fn: ast.FunctionDef) -> bool:
    """Whether ``fn`` itself (not a function nested in it) returns a value."""
    todo, found = list(fn.body), False
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        if isinstance(node, ast.Return) and node.value is not None:
            found = True
        todo.extend(ast.iter_child_nodes(node))
    return found


def test_public_names_have_args_and_returns():
    """Every public function and method of the command line, deep_ep.bench and deep_ep.tools has a
    docstring with ``Args:`` (when it takes arguments) and ``Returns:`` (when it returns a value); a
    class's ``__init__`` may leave its Args to the class docstring."""
    bad = []
    for path in _py_files(["deep_ep/cli.py", "deep_ep/__main__.py", "deep_ep/bench", "deep_ep/tools"]):
        rel = os.path.relpath(path, REPO)

        def visit(nodes, owner=None):
            for n in nodes:
                if isinstance(n, ast.ClassDef) and not n.name.startswith("_"):
                    if not ast.get_docstring(n):
                        bad.append(f"{rel}:{n.lineno} class {n.name}")
                    visit(n.body, owner=n)
                elif isinstance(n, ast.FunctionDef) and (not n.name.startswith("_") or n.name == "__call__"):
                    if any(isinstance(d, ast.Name) and d.id == "property" for d in n.decorator_list):
                        continue
                    doc = ast.get_docstring(n) or ""
                    args = [a.arg for a in n.args.args + n.args.kwonlyargs if a.arg not in ("self", "cls")]
                    if args and "Args:" not in doc:
                        bad.append(f"{rel}:{n.lineno} {n.name}: no Args")
                    if _own_returns(n) and "Returns:" not in doc:
                        bad.append(f"{rel}:{n.lineno} {n.name}: no Returns")
                elif isinstance(n, ast.FunctionDef) and n.name == "__init__" and owner is not None:
                    doc = (ast.get_docstring(n) or "") + (ast.get_docstring(owner) or "")
                    if len(n.args.args) > 1 and "Args:" not in doc:
                        bad.append(f"{rel}:{n.lineno} {owner.name}.__init__: no Args")

        visit(ast.parse(open(path).read(), path).body)
    assert not bad, "\n".join(bad)
