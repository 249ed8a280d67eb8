#!/usr/bin/env python3
"""Fails when a module of the crate imports, directly or through others, a module that
imports it back. Edges are `crate::m` mentions between top-level modules of src/ (a file
or a folder); unit tests (`#[cfg(test)] mod tests`) may reach anywhere."""
import os
import re
import sys

src = sys.argv[1] if len(sys.argv) > 1 else "src"
files = {}
for root, _, names in os.walk(src):
    for name in names:
        if name.endswith(".rs"):
            rel = os.path.relpath(os.path.join(root, name), src).split(os.sep)[0]
            top = rel[:-3] if rel.endswith(".rs") else rel
            if top not in ("main", "lib", "bin"):
                files.setdefault(top, []).append(os.path.join(root, name))

edges = {m: set() for m in files}
for m, paths in files.items():
    for p in paths:
        text = open(p, encoding="utf-8").read()
        text = re.split(r"#\[cfg\(test\)\]\s*mod\s+tests", text)[0]
        names = set(re.findall(r"crate::(\w+)", text))
        for group in re.findall(r"use\s+crate::\{([^}]*)\}", text, re.S):
            names |= {x.strip().split("::")[0] for x in group.split(",") if x.strip()}
        edges[m] |= {n for n in names if n in files and n != m}


def reaches(a, b):
    seen, todo = set(), [a]
    while todo:
        x = todo.pop()
        for y in edges[x]:
            if y == b:
                return True
            if y not in seen:
                seen.add(y)
                todo.append(y)
    return False


cycles = sorted({tuple(sorted((a, b))) for a in edges for b in edges[a] if reaches(b, a)})
for a, b in cycles:
    print(f"module cycle: {a} <-> {b}")
print(f"{len(files)} modules, {sum(map(len, edges.values()))} edges, {len(cycles)} cyclic pairs")
sys.exit(1 if cycles else 0)
