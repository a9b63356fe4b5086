"""Which environment variables each workspace binary reads, from its Rust source.

A static, deliberately simple reading of the code (no rustc): it finds the
variables (`pub const X: &str = "X"`, `std::env::var("X")`, clap's
`env = "X"`, `EnvFilter::*_default_env` for `RUST_LOG`, a literal key given to
a `ConfigReader` method), the functions that mention them, and follows calls
written as paths (`ChatConfig::read`, `telemetry::init`, `Self::f`, a free
`f(` of the same crate) from each binary's root file. Method calls
(`x.read()`) are not followed: a variable only reachable that way is reported
as read by no binary, and `check_k8s.py` fails until it is attributed or
allowlisted, so a gap shows instead of passing silently.

Test-only code is left out: items under `#[cfg(test)]`,
`#[cfg(any(test, ...))]`, `#[test]`, `#[tokio::test]`, and the files of
modules declared under them (`#[cfg(test)] mod tests;`).

Run it alone to see the result: `python3 scripts/check_k8s_env.py`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

VAR_NAME = r"[A-Z][A-Z0-9_]*[A-Z0-9]"
CONST_DEF = re.compile(r'\bconst\s+(' + VAR_NAME + r')\s*:\s*&(?:\'static\s+)?str\s*=\s*"(' + VAR_NAME + r')"\s*;')
LITERAL_READS = [
    re.compile(r'\benv::var(?:_os)?\(\s*"(' + VAR_NAME + r')"'),
    re.compile(r'\benv\s*=\s*"(' + VAR_NAME + r')"'),  # clap #[arg(env = "X")]
    re.compile(
        r'\.(?:string|optional|secret|parse|positive|secs|millis|url|url_list)\(\s*"(' + VAR_NAME + r')"'
    ),
]
IMPLICIT_READS = [
    (re.compile(r"\bEnvFilter::(?:try_)?from_default_env\b"), "RUST_LOG"),
]
TEST_ATTR = re.compile(
    r"#\[\s*(?:cfg\(\s*(?:test|any\([^\]]*?\btest\b[^\]]*?\))\s*\)|test|tokio::test[^\]]*)\s*\]"
)
ITEM_KEYWORDS = re.compile(
    r"\s*(?:pub(?:\([^)]*\))?\s+)?(?:async\s+|unsafe\s+|const\s+|extern\s+(?:\"[^\"]*\"\s+)?)*"
    r"(fn|mod|impl|struct|enum|trait|type|use|static|const|macro_rules!|let)\b"
)


def mask(src: str) -> tuple[str, str]:
    """(code, bare): comments blanked in both; string and char literal
    contents also blanked in `bare`. Same length, so offsets agree."""
    code = list(src)
    bare = list(src)
    i, n = 0, len(src)

    def blank(a: int, b: int, both: bool) -> None:
        for k in range(a, b):
            if src[k] != "\n":
                bare[k] = " "
                if both:
                    code[k] = " "

    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            blank(i, j, True)
            i = j
        elif src.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if src.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif src.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            blank(i, j, True)
            i = j
        elif c == "r" and re.match(r'r#*"', src[i:i + 10]) and not (i and (src[i - 1].isalnum() or src[i - 1] == "_")):
            hashes = re.match(r"r(#*)\"", src[i:]).group(1)
            start = i + 2 + len(hashes)
            end = src.find('"' + hashes, start)
            end = n if end < 0 else end
            blank(start, end, False)
            i = end + 1 + len(hashes)
        elif c == '"':
            j = i + 1
            while j < n and src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            blank(i + 1, j, False)
            i = j + 1
        elif c == "'":
            m = re.match(r"'(?:\\u\{[0-9a-fA-F]+\}|\\.|[^\\'\n])'", src[i:])
            if m:
                blank(i + 1, i + len(m.group(0)) - 1, False)
                i += len(m.group(0))
            else:
                i += 1  # a lifetime
        else:
            i += 1
    return "".join(code), "".join(bare)


def matching_brace(bare: str, open_at: int) -> int:
    depth = 0
    for k in range(open_at, len(bare)):
        if bare[k] == "{":
            depth += 1
        elif bare[k] == "}":
            depth -= 1
            if depth == 0:
                return k + 1
    return len(bare)


def item_end(bare: str, start: int) -> int:
    """End of the item (or field, statement) starting at `start`."""
    keyword = ITEM_KEYWORDS.match(bare, start)
    depth = 0
    k = start
    while k < len(bare):
        ch = bare[k]
        if ch in "([":
            depth += 1
        elif ch in ")]":
            if depth == 0:  # the end of an enclosing list: a field that is last
                return k
            depth -= 1
        elif depth == 0 and ch == ";":
            return k + 1
        elif depth == 0 and ch == "," and not keyword:
            return k + 1
        elif depth == 0 and ch == "{":
            end = matching_brace(bare, k)
            return end + 1 if bare[end:end + 1] == ";" else end
        elif depth == 0 and ch == "}":
            return k
        k += 1
    return k


def strip_tests(code: str, bare: str) -> tuple[str, str, list[tuple[str, str | None]]]:
    """Blanks test-only items; returns the test-only `mod x;` declarations too."""
    skipped_mods: list[tuple[str, str | None]] = []
    code_l, bare_l = list(code), list(bare)
    pos = 0
    while True:
        m = TEST_ATTR.search(bare, pos)
        if not m:
            break
        start = m.start()
        k = m.end()
        path_attr = None
        while True:  # further attributes on the same item
            while k < len(bare) and bare[k].isspace():
                k += 1
            if bare.startswith("#[", k):
                close = bare.find("]", k)
                pm = re.match(r'#\[\s*path\s*=\s*"([^"]*)"', code[k:close + 1])
                if pm:
                    path_attr = pm.group(1)
                k = close + 1
            else:
                break
        mm = re.match(r"(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;", bare[k:])
        if mm:
            skipped_mods.append((mm.group(1), path_attr))
        end = item_end(bare, k)
        for j in range(start, end):
            if bare_l[j] != "\n":
                bare_l[j] = " "
                code_l[j] = " "
        bare = "".join(bare_l)
        pos = end
    return "".join(code_l), "".join(bare_l), skipped_mods


@dataclass
class Fn:
    crate: str
    file: Path
    module: str
    impl_type: str | None
    name: str
    body: str  # bare text
    body_code: str  # with literals
    span: tuple[int, int] = (0, 0)
    direct: set[str] = field(default_factory=set)
    callees: set[int] = field(default_factory=set)


@dataclass
class SourceFile:
    crate: str
    path: Path
    code: str
    bare: str


def module_name(path: Path, crate: str) -> str:
    if path.name in ("lib.rs", "main.rs"):
        return crate
    if path.name == "mod.rs":
        return path.parent.name
    return path.stem


def crate_files(root: Path, crate: str) -> list[SourceFile]:
    """The non-test files compiled from a crate root, following `mod x;`."""
    out: list[SourceFile] = []
    todo = [root]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen or not path.exists():
            continue
        seen.add(path)
        code, bare = mask(path.read_text(encoding="utf-8"))
        code, bare, _skipped = strip_tests(code, bare)
        out.append(SourceFile(crate, path, code, bare))
        if path.name in ("lib.rs", "main.rs", "mod.rs") or path == root:
            base = path.parent
        else:
            base = path.parent / path.stem
        for m in re.finditer(r"(?:#\[\s*path\s*=\s*\"([^\"]*)\"\s*\]\s*)?(?:pub(?:\([^)]*\))?\s+)?\bmod\s+(\w+)\s*;", code):
            if m.group(1):
                todo.append(path.parent / m.group(1))
            else:
                name = m.group(2)
                todo.extend([base / f"{name}.rs", base / name / "mod.rs"])
    return out


def impl_blocks(bare: str) -> list[tuple[int, int, str]]:
    blocks = []
    for m in re.finditer(r"\bimpl\b", bare):
        brace = bare.find("{", m.end())
        semi = bare.find(";", m.end())
        if brace < 0 or (0 <= semi < brace):
            continue
        header = bare[m.end():brace]
        header = re.split(r"\bwhere\b", header)[0]
        header = re.sub(r"^\s*<", "<", header)
        # drop the impl's own generics: impl<T: X> ...
        if header.lstrip().startswith("<"):
            depth, k = 0, header.index("<")
            while k < len(header):
                depth += header[k] == "<"
                depth -= header[k] == ">"
                k += 1
                if depth == 0:
                    break
            header = header[k:]
        target = header.split(" for ", 1)[1] if " for " in header else header
        names = re.findall(r"[A-Za-z_]\w*", re.sub(r"<.*", "", target.strip()))
        if names:
            blocks.append((brace, matching_brace(bare, brace), names[-1]))
    return blocks


def functions(sf: SourceFile) -> list[Fn]:
    fns = []
    impls = impl_blocks(sf.bare)
    for m in re.finditer(r"\bfn\s+([A-Za-z_]\w*)", sf.bare):
        k, depth = m.end(), 0
        while k < len(sf.bare):
            ch = sf.bare[k]
            if ch in "([<":
                depth += 1
            elif ch in ")]>" and not sf.bare[k - 1] == "-":
                depth -= 1
            elif ch == ";" and depth <= 0:
                k = -1
                break
            elif ch == "{" and depth <= 0:
                break
            k += 1
        if k < 0 or k >= len(sf.bare):
            continue
        end = matching_brace(sf.bare, k)
        owner = None
        for a, b, name in impls:
            if a < m.start() < b:
                owner = name  # innermost wins: later blocks start later
        fns.append(Fn(sf.crate, sf.path, module_name(sf.path, sf.crate), owner, m.group(1),
                      sf.bare[k:end], sf.code[k:end], span=(k, end)))
    return fns


def literal_vars(code: str) -> set[str]:
    found = set()
    for rx in LITERAL_READS:
        found.update(rx.findall(code))
    for rx, var in IMPLICIT_READS:
        if rx.search(code):
            found.add(var)
    return found


@dataclass
class Analysis:
    declared: dict[str, list[str]]  # var -> where it is declared (const)
    binaries: dict[str, set[str]]  # binary -> vars it reads
    read_anywhere: set[str]


def analyse(root: Path) -> Analysis:
    meta = json.loads(subprocess.run(
        ["cargo", "metadata", "--no-deps", "--format-version", "1", "--offline"],
        cwd=root, check=True, capture_output=True, text=True).stdout)
    files: list[SourceFile] = []
    bins: dict[str, tuple[str, Path]] = {}
    for pkg in meta["packages"]:
        crate = pkg["name"].replace("-", "_")
        for t in pkg["targets"]:
            if "lib" in t["kind"] or "bin" in t["kind"]:
                files.extend(crate_files(Path(t["src_path"]), crate))
            if "bin" in t["kind"]:
                bins[t["name"]] = (crate, Path(t["src_path"]))
    unique = {(f.path): f for f in files}
    files = list(unique.values())

    declared: dict[str, list[str]] = {}
    for sf in files:
        for m in CONST_DEF.finditer(sf.code):
            if m.group(1) == m.group(2):
                declared.setdefault(m.group(1), []).append(str(sf.path.relative_to(root)))

    fns: list[Fn] = []
    file_level: dict[Path, set[str]] = {}
    for sf in files:
        these = functions(sf)
        fns.extend(these)
        outside = list(sf.code)
        for f in these:  # literal reads outside any fn: clap attributes, statics
            for k in range(*f.span):
                outside[k] = " "
        file_level[sf.path] = literal_vars("".join(outside))

    var_rx = re.compile(r"\b(" + "|".join(sorted(declared, key=len, reverse=True)) + r")\b") if declared else None
    for f in fns:
        if var_rx:
            f.direct.update(var_rx.findall(f.body))
        f.direct.update(literal_vars(f.body_code))

    # calls written as paths
    by_path: dict[str, list[int]] = {}
    for i, f in enumerate(fns):
        if f.impl_type:
            by_path.setdefault(f"{f.impl_type}::{f.name}", []).append(i)
        else:
            by_path.setdefault(f"{f.module}::{f.name}", []).append(i)
    free_by_crate: dict[tuple[str, str], list[int]] = {}
    for i, f in enumerate(fns):
        if not f.impl_type:
            free_by_crate.setdefault((f.crate, f.name), []).append(i)
    path_rx = re.compile(r"(?=\b([A-Za-z_]\w*)::([a-z_]\w*)\b)")  # overlapping: a::b::c
    bare_call_rx = re.compile(r"(?<![\w.:])([a-z_]\w*)\s*(?:::<[^>]*>)?\(")
    for f in fns:
        for a, b in path_rx.findall(f.body):
            if a == "Self" and f.impl_type:
                a = f.impl_type
            f.callees.update(by_path.get(f"{a}::{b}", []))
        for name in bare_call_rx.findall(f.body):
            f.callees.update(free_by_crate.get((f.crate, name), []))

    # vars(f) = direct(f) ∪ vars(callees), to a fixpoint
    reads = [set(f.direct) for f in fns]
    changed = True
    while changed:
        changed = False
        for i, f in enumerate(fns):
            for c in f.callees:
                if not reads[c] <= reads[i]:
                    reads[i] |= reads[c]
                    changed = True

    binaries: dict[str, set[str]] = {}
    for name, (crate, root_file) in bins.items():
        vars_ = set(file_level.get(root_file, set()))
        for i, f in enumerate(fns):
            if f.file == root_file:
                vars_ |= reads[i]
        binaries[name] = vars_
    anywhere = set().union(*reads) if reads else set()
    for v in file_level.values():
        anywhere |= v
    return Analysis(declared, binaries, anywhere)


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    a = analyse(root)
    for name, vars_ in sorted(a.binaries.items()):
        print(f"{name}: {' '.join(sorted(vars_))}")
    unread = sorted(set(a.declared) - a.read_anywhere)
    print(f"declared but read nowhere: {' '.join(unread) or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
