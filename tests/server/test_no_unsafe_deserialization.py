"""Guard: no code in the package can deserialize bytes into objects (pickle and its relatives).

kvwire reads bitstreams, manifests, profiles and job requests from the network and from shared
stores; a pickle (or ``torch.load`` without ``weights_only=True``, or ``numpy.load`` with
``allow_pickle=True``) of such bytes runs arbitrary code. The scan parses every module with ``ast``
and resolves import aliases, so comments, strings and docstrings that merely mention pickle do not
count, while ``import pickle as p; p.loads(x)`` does.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: The installed package's folders (pyproject.toml's package-dir); kvwire/_proto is generated.
PACKAGE_DIRS = ("kvwire", "kernels", "server", "client")
GENERATED = ("kvwire/_proto/",)

#: Modules whose only purpose is turning bytes into arbitrary objects: importing them is refused.
UNSAFE_MODULES = {
    "pickle",
    "cPickle",
    "_pickle",
    "dill",
    "cloudpickle",
    "joblib",
    "marshal",
    "shelve",
    "jsonpickle",
}
#: Calls that unpickle: refused unless made safe by a keyword (see ``_unsafe_call``).
UNSAFE_CALLS = {
    "torch.load",
    "torch.serialization.load",
    "pandas.read_pickle",
    "numpy.load",
    "yaml.load",
    "yaml.unsafe_load",
    "yaml.full_load",
}


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> qualified name for every import in the module (``np`` -> ``numpy``)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = alias.name
                else:
                    root = alias.name.split(".")[0]
                    names[root] = root
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _qualified(func: ast.expr, aliases: dict[str, str]) -> str | None:
    parts: list[str] = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None
    root = aliases.get(func.id, func.id)
    return ".".join([root, *reversed(parts)])


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords
    )


def _unsafe_call(name: str, call: ast.Call) -> bool:
    if name in ("torch.load", "torch.serialization.load"):
        return not _keyword_is(call, "weights_only", True)
    if name == "numpy.load":
        allow = [k for k in call.keywords if k.arg == "allow_pickle"]
        return bool(allow) and not _keyword_is(call, "allow_pickle", False)
    if name == "yaml.load":
        loader = next((k.value for k in call.keywords if k.arg == "Loader"), None)
        return not (isinstance(loader, ast.Attribute | ast.Name) and "Safe" in ast.unparse(loader))
    return True


def find_unsafe_deserialization(source: str, filename: str = "<source>") -> list[str]:
    """``file:line: what`` for every unsafe import or call in ``source``."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for module in modules:
                if module.split(".")[0] in UNSAFE_MODULES:
                    found.append(f"{filename}:{node.lineno}: imports {module}")
        elif isinstance(node, ast.Call):
            name = _qualified(node.func, aliases)
            if name is None:
                continue
            if name.split(".")[0] in UNSAFE_MODULES:
                found.append(f"{filename}:{node.lineno}: calls {name}")
            elif name in UNSAFE_CALLS and _unsafe_call(name, node):
                found.append(f"{filename}:{node.lineno}: calls {name} unsafely")
            elif any(k.arg == "allow_pickle" for k in node.keywords) and not _keyword_is(
                node, "allow_pickle", False
            ):
                found.append(f"{filename}:{node.lineno}: {name}(allow_pickle=...) not False")
    return found


def package_sources() -> list[Path]:
    files = []
    for folder in PACKAGE_DIRS:
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if not rel.startswith(GENERATED):
                files.append(path)
    return files


def test_package_never_unpickles() -> None:
    files = package_sources()
    assert len(files) > 20 and any(p.name == "service.py" for p in files)  # the scan sees the package
    found = [hit for path in files for hit in find_unsafe_deserialization(path.read_text(), str(path))]
    assert not found, "unsafe deserialization:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "source",
    [
        "import pickle\n",
        "import pickle as p\np.loads(b)\n",
        "from pickle import loads\n",
        "import torch\ntorch.load(f)\n",
        "import torch as t\nt.load(f, weights_only=False)\n",
        "from torch import load\nload(f)\n",
        "import numpy as np\nnp.load(f, allow_pickle=True)\n",
        "import numpy\nnumpy.load(f, allow_pickle=flag)\n",
        "import yaml\nyaml.load(s)\n",
        "import pandas as pd\npd.read_pickle(f)\n",
        "import marshal\n",
        "import joblib\n",
    ],
)
def test_scanner_finds_unsafe_code(source: str) -> None:
    assert find_unsafe_deserialization(source)


@pytest.mark.parametrize(
    "source",
    [
        "# pickle.loads(b) in a comment\n'torch.load in a string'\n",
        "import torch\ntorch.load(f, weights_only=True)\n",
        "import numpy as np\nnp.load(f)\nnp.load(f, allow_pickle=False)\nnp.save(f, a, allow_pickle=False)\n",
        "import yaml\nyaml.load(s, Loader=yaml.SafeLoader)\nyaml.safe_load(s)\n",
        "import json\njson.loads(b)\n",
    ],
)
def test_scanner_accepts_safe_code(source: str) -> None:
    assert find_unsafe_deserialization(source) == []
