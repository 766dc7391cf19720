"""The codebase's reading goals, kept as it grows: the modules form no import circle (imports
inside functions counted), no command is imported for a library piece, the two functions a
reader starts from stay short and early, and the README stays a guide, not a notebook.
Read from the source with `ast`; nothing is run."""

import ast
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(f[:-3] for f in os.listdir(REPO) if f.endswith(".py"))
# modules that are commands only; retrieve.py, explain.py and plot.py are library modules
# (retrieval's evaluation, attribution, curves) with a command of their own. Chaining one
# command from another (train_caption.py runs train_align.main) is allowed, and bench.py times
# the commands themselves.
COMMANDS = {"sample", "classify", "train_bind", "train_align", "train_caption", "bench"}
CHAINS = {("train_caption", "train_align"), ("bench", "sample"), ("bench", "train_align"), ("bench", "train_caption")}


def tree(module):
    with open(os.path.join(REPO, module + ".py")) as f:
        return ast.parse(f.read())


def imports(module):
    """The project's modules that `module` imports anywhere in it, functions included."""
    found = set()
    for node in ast.walk(tree(module)):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found & set(MODULES) - {module}


def test_no_module_imports_one_that_imports_it_back():
    graph = {m: imports(m) for m in MODULES}

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, seen + (n,))) for n in graph[start])

    circles = [m for m in MODULES if reaches(m, m)]
    assert not circles, f"modules on an import circle: {circles}"


def test_commands_are_imported_only_to_be_chained_or_timed():
    """Pieces several commands share live in the library modules (data, model, training, ...)."""
    wrong = [(m, c) for m in MODULES for c in imports(m) & COMMANDS if (m, c) not in CHAINS]
    assert not wrong, f"a command imported for a library piece: {wrong}"


def function(module, name, cls=None):
    """(the function's node, the class's node or None)."""
    for node in tree(module).body:
        if cls is None and isinstance(node, ast.FunctionDef) and node.name == name:
            return node, None
        if isinstance(node, ast.ClassDef) and node.name == cls:
            return next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == name), node
    raise LookupError(name)


def test_train_caption_main_reads_on_one_screen_and_a_half():
    main, _ = function("train_caption", "main")
    assert main.end_lineno - main.lineno + 1 <= 100


def test_the_captioners_forward_comes_early_in_its_class():
    forward, cls = function("model", "forward", cls="UniQ4Cap")
    assert forward.lineno - cls.lineno <= 60


def test_the_readme_is_a_guide_without_commit_ids():
    text = open(os.path.join(REPO, "README.md")).read()
    assert len(text) <= 20_000
    ids = [w for w in re.findall(r"\b[0-9a-f]{7,40}\b", text) if re.search(r"[a-f]", w) and re.search(r"\d", w)]
    assert not ids, f"commit ids in the README: {ids}"
