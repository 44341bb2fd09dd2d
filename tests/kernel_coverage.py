"""Line coverage of the ``@triton.jit`` function bodies in ``deep_ep/kernels/`` (coverage.py data of a run of
the kernel tests under Triton's interpreter, whose programs execute those lines as Python).

    TRITON_INTERPRET=1 python -m coverage run --include='deep_ep/kernels/*' -m pytest -m kernels -q
    python -m tests.kernel_coverage [--fail-under 85]

Prints each kernel function's covered / total statement lines and the total; exits 1 under the bound.
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import sys

KERNELS = pathlib.Path(__file__).resolve().parent.parent / "deep_ep" / "kernels"


def _is_jit(dec: ast.expr) -> bool:
    target = dec.func if isinstance(dec, ast.Call) else dec
    return (
        isinstance(target, ast.Attribute)
        and target.attr == "jit"
        or (isinstance(target, ast.Name) and target.id == "jit")
    )


def jit_body_lines(path: pathlib.Path):
    """``{function name: set of statement line numbers in its body}`` for every ``@triton.jit`` function
    (docstrings excluded)."""
    tree = ast.parse(path.read_text())
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and any(_is_jit(d) for d in node.decorator_list):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                body = body[1:]
            lines = set()
            for stmt in body:
                for sub in ast.walk(stmt):
                    if isinstance(sub, ast.stmt):
                        lines.add(sub.lineno)
            out[node.name] = lines
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-file", default=".coverage")
    ap.add_argument("--fail-under", type=float, default=0.0)
    args = ap.parse_args(argv)
    import coverage

    cov = coverage.Coverage(data_file=args.data_file)
    cov.load()
    data = cov.get_data()
    total = hit = 0
    rows = []
    for path in sorted(KERNELS.glob("*.py")):
        funcs = jit_body_lines(path)
        if not funcs:
            continue
        executed = set(data.lines(str(path)) or [])
        for name, lines in sorted(funcs.items()):
            h = len(lines & executed)
            rows.append((f"{path.name}:{name}", h, len(lines), sorted(lines - executed)))
            total += len(lines)
            hit += h
    for name, h, n, missed in rows:
        miss = f"  missed {missed}" if missed else ""
        print(f"{name:40s} {h:4d} / {n:4d}{miss}")
    pct = 100.0 * hit / max(total, 1)
    print(f"{'TOTAL @triton.jit body lines':40s} {hit:4d} / {total:4d}  = {pct:.1f}%")
    if pct < args.fail_under:
        print(f"below --fail-under {args.fail_under}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
