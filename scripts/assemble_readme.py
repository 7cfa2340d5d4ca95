#!/usr/bin/env python3
"""Builds README.md from docs/readme/*.md fragments plus the hand-written head
(docs/readme/_head.md) and the merge-engine sections (docs/readme/merge.md).
Top-level '#' headings of fragments become '##' (outside code fences)."""
import pathlib, re
root = pathlib.Path(__file__).resolve().parent.parent
d = root / "docs/readme"
order = ["_head", "gateway", "evalsched", "merge", "moe", "runtime", "generate", "zoo",
         "eval", "deploy", "benchmarks", "perf", "_tests"]

def demote(text):
    out, fence = [], False
    lines = text.splitlines()
    top = min((len(m.group(1)) for l in lines for m in [re.match(r"^(#+) ", l)] if m), default=2)
    shift = max(0, 2 - top)
    for l in lines:
        if l.startswith("```"):
            fence = not fence
        if not fence and shift and re.match(r"^#+ ", l):
            l = "#" * shift + l
        out.append(l)
    return "\n".join(out).strip() + "\n"

parts = []
for name in order:
    p = d / f"{name}.md"
    if p.exists():
        parts.append(demote(p.read_text()) if not name.startswith("_") else p.read_text().strip() + "\n")
(root / "README.md").write_text("\n".join(parts))
print("README.md:", sum(len(x.splitlines()) for x in parts), "lines")
