"""Static checks of the 3D Slicer extension, which cannot run here (no Slicer in CI).

- BrainAge/BrainAge.py compiles, stays readable (< MAX_MODULE_LINES, the four classes of Slicer's
  scripted-module template), and uses only Slicer API names listed in ``slicer-api/`` (read from
  Slicer's source): ``slicer.util`` functions, ScriptedLoadableModule* base methods, MRML node
  methods, PyTorchUtils logic methods, and widgets that exist in its .ui file.
- The CMake lists name only files that exist, and list every BrainAgeLib ``.py`` file and every
  resource file (found by globbing, so files added later are caught).
- The extension's metadata (CMake, BrainAge.json) is complete and consistent.

The API lists are read from ``../shared/slicer-api`` beside the repository when it is there, else
from the copies committed under ``Testing/slicer-api`` (which must then equal the shared ones).
Failures name the file and line to fix.
"""
from __future__ import annotations

import ast
import io
import json
import py_compile
import re
import shutil
import subprocess
import unittest
from pathlib import Path
from typing import Dict, List, Set

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "BrainAge"
MODULE = MODULE_DIR / "BrainAge.py"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
TOP_CMAKE = REPO / "CMakeLists.txt"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "BrainAge.ui"
EXTENSION_JSON = REPO / "BrainAge.json"
SHARED_API = REPO.parent / "shared" / "slicer-api"
COPIED_API = REPO / "Testing" / "slicer-api"
API_FILES = ("slicer_util_functions.txt", "scripted_loadable_module_methods.txt",
             "mrml_methods.txt", "pytorchutils_logic.txt")
#: The four classes of the template and the parameter node; everything computable lives in BrainAgeLib
#: (the worker: worker_protocol; the panel's choices and texts: slicer_bridge).
MAX_MODULE_LINES = 820
#: CamelCase methods BrainAge.py calls on VTK objects that are not MRML nodes, and on what.
NON_MRML_METHODS = {
    "GetDimensions": "vtkImageData, from volumeNode.GetImageData()",
    "GetNumberOfScalarComponents": "vtkImageData, from volumeNode.GetImageData()",
    "SetTableRange": "vtkLookupTable, from colorNode.GetLookupTable()",
    "AddObserver": "vtkObject's, on slicer.mrmlScene and on the parameter node (parameterNodeWrapper.AddObserver)",
    "RemoveObserver": "vtkObject's, on slicer.mrmlScene and on the parameter node (parameterNodeWrapper.RemoveObserver)",
}
#: MRML methods of classes the lists leave out (they cover the volume, display, colour and scene classes).
UNLISTED_MRML_METHODS = {
    "GetLabelVolumeID": "vtkMRMLSliceCompositeNode (Libs/MRML/Core/vtkMRMLSliceCompositeNode.h)",
    "SetLabelOpacity": "vtkMRMLSliceCompositeNode (Libs/MRML/Core/vtkMRMLSliceCompositeNode.h)",
}
#: Methods BrainAge.py calls on its parameter node, each a ``parameterNodeWrapper.X`` member.
PARAMETER_NODE_METHODS = {"connectGui", "disconnectGui", "StartModify", "EndModify", "AddObserver", "RemoveObserver"}
#: Slicer releases whose API lists the module is checked against: the newest (the lists' top folder) and the
#: oldest supported, 5.10 (``v5.10.0/``; BrainAgeLib.slicer_bridge.OLDEST_SLICER).
RELEASES = ("newest", "v5.10.0")
CATALOG_SCHEMA = REPO / "Testing" / "schemas" / "slicer-extension-catalog-entry-schema-v1.0.2.json"
#: ``slicer.<name>`` attributes BrainAge.py may use (the lists cover slicer.util only).
SLICER_TOP_LEVEL = {"util", "mrmlScene"}
#: Files under Resources/ that are documentation, not runtime resources.
UNINSTALLED_RESOURCE_FOLDERS = {"Screenshots"}


# --- helpers ------------------------------------------------------------------------------

def api_names(file_name: str, release: str = "newest") -> List[str]:
    folder = SHARED_API if SHARED_API.is_dir() else COPIED_API
    if release != "newest":
        folder = folder / release
    if not (folder / file_name).is_file():
        pytest.skip(f"no {release} list {file_name} in {folder}")
    return [line.strip() for line in (folder / file_name).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def source_lines() -> List[str]:
    return MODULE.read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="module")
def tree() -> ast.Module:
    return ast.parse(MODULE.read_text(encoding="utf-8"), filename=str(MODULE))


def where(node: ast.AST, lines: List[str]) -> str:
    return f"BrainAge/BrainAge.py:{node.lineno}: {lines[node.lineno - 1].strip()}"


def dotted(node: ast.AST) -> str:
    """'a.b.c' for a chain of names and attributes, '' for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = dotted(node.value)
        return f"{inner}.{node.attr}" if inner else ""
    return ""


def imported_modules(tree: ast.Module) -> Set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names.add(alias.asname or alias.name)
                names.update(alias.name.split(".")[:1])
    return names


_CMAKE_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|#[^\n]*|[()]|[^\s()#"]+')


def cmake_commands(path: Path) -> List[tuple]:
    """The commands of a CMake file as (name in lower case, [arguments, quotes removed])."""
    commands, name, args, depth = [], None, [], 0
    for token in _CMAKE_TOKEN.findall(path.read_text()):
        if token.startswith("#"):
            continue
        if token == "(":
            depth += 1
            if depth > 1:
                args.append(token)
        elif token == ")":
            depth -= 1
            if depth == 0:
                commands.append((name.lower(), args))
                name, args = None, []
            else:
                args.append(token)
        elif depth == 0:
            name = token
        else:
            args.append(token[1:-1] if token.startswith('"') else token)
    return commands


def cmake_sets(path: Path) -> Dict[str, List[str]]:
    """``set(NAME values...)`` of a CMake file: NAME -> values."""
    return {args[0]: args[1:] for name, args in cmake_commands(path) if name == "set"}


def cmake_line(path: Path, needle: str) -> str:
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if needle in line:
            return f"{path.relative_to(REPO)}:{number}: {line.strip()}"
    return f"{path.relative_to(REPO)}"


# --- BrainAge.py --------------------------------------------------------------------------

def test_module_compiles_and_stays_readable(tmp_path, tree, source_lines):
    py_compile.compile(str(MODULE), cfile=str(tmp_path / "BrainAge.pyc"), doraise=True)
    assert len(source_lines) < MAX_MODULE_LINES, f"BrainAge.py has {len(source_lines)} lines; keep it under {MAX_MODULE_LINES}"
    bases = {node.name: [dotted(base) for base in node.bases] for node in tree.body if isinstance(node, ast.ClassDef)}
    assert bases["BrainAge"] == ["ScriptedLoadableModule"]
    assert bases["BrainAgeWidget"][0] == "ScriptedLoadableModuleWidget"
    assert bases["BrainAgeLogic"] == ["ScriptedLoadableModuleLogic"]
    assert bases["BrainAgeTest"] == ["ScriptedLoadableModuleTest"]
    text = MODULE.read_text()
    assert 'self.parent.title = "Brain Age"' in text
    assert "2511.15188" in text, "the acknowledgement must cite BrainRotViT (arXiv 2511.15188)"


def test_no_undefined_or_unused_names_in_the_module_library_scripts_or_tests():
    """pyflakes over every Python file: an undefined name in BrainAge.py would only show inside
    Slicer, which CI cannot run; unused imports and variables are dead code."""
    from pyflakes import api
    from pyflakes.reporter import Reporter

    out, err = io.StringIO(), io.StringIO()
    files = [MODULE, *sorted((REPO / "BrainAgeLib").rglob("*.py")), *sorted((REPO / "scripts").glob("*.py")),
             *sorted((REPO / "Testing").glob("*.py"))]
    problems = sum(api.checkPath(str(path), Reporter(out, err)) for path in files)
    assert problems == 0, out.getvalue() + err.getvalue()


def test_api_copies_match_the_shared_lists():
    if not SHARED_API.is_dir():
        pytest.skip("../shared/slicer-api is not beside this checkout; the committed copies are used")
    shared = [path.relative_to(SHARED_API) for path in SHARED_API.rglob("*.txt")]
    assert {str(name) for name in shared} >= set(API_FILES)
    for name in shared:
        assert (COPIED_API / name).is_file() and (COPIED_API / name).read_text() == (SHARED_API / name).read_text(), (
            f"Testing/slicer-api/{name} differs from ../shared/slicer-api/{name}; copy it again")


@pytest.mark.parametrize("release", RELEASES)
def test_only_listed_slicer_util_functions_are_used(tree, source_lines, release):
    listed = set(api_names("slicer_util_functions.txt", release))
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and dotted(node.value) == "slicer.util" and node.attr not in listed:
            problems.append(f"{where(node, source_lines)}  <- slicer.util.{node.attr} is not in slicer_util_functions.txt")
        if isinstance(node, ast.Attribute) and dotted(node.value) == "slicer" and node.attr not in SLICER_TOP_LEVEL:
            problems.append(f"{where(node, source_lines)}  <- slicer.{node.attr} is not a listed Slicer API name")
        if isinstance(node, ast.ImportFrom) and node.module == "slicer.util":
            problems += [f"{where(node, source_lines)}  <- slicer.util.{a.name} is not in slicer_util_functions.txt"
                         for a in node.names if a.name not in listed]
    assert not problems, "\n".join(problems)
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and dotted(n.value) == "slicer.util"}
    assert {"loadUI", "childWidgetVariables", "arrayFromVolume", "updateVolumeFromArray", "pip_install"} <= used


@pytest.mark.parametrize("release", RELEASES)
def test_scripted_module_base_methods_exist(tree, source_lines, release):
    listed = set(api_names("scripted_loadable_module_methods.txt", release))
    test_case_methods = set(dir(unittest.TestCase))
    problems = []
    for cls in (node for node in tree.body if isinstance(node, ast.ClassDef)):
        base = next((dotted(b) for b in cls.bases if dotted(b).startswith("ScriptedLoadableModule")), None)
        if base is None:
            continue
        own = {f.name for f in cls.body if isinstance(f, ast.FunctionDef)}
        own |= {t.attr for n in ast.walk(cls) if isinstance(n, ast.Assign) for t in n.targets
                if isinstance(t, ast.Attribute) and dotted(t.value) == "self"}
        for call in (n for n in ast.walk(cls) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)):
            receiver, method = dotted(call.func.value), call.func.attr
            if method.startswith("__"):
                continue
            if receiver == "self" and method not in own:
                known = f"{base}.{method}" in listed or (base == "ScriptedLoadableModuleTest" and method in test_case_methods)
            elif receiver.startswith("ScriptedLoadableModule") or (
                    isinstance(call.func.value, ast.Call) and dotted(call.func.value.func) == "super"):
                known = f"{receiver or base}.{method}" in listed
            else:
                continue
            if not known:
                problems.append(f"{where(call, source_lines)}  <- {base}.{method} is not in scripted_loadable_module_methods.txt")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("release", RELEASES)
def test_mrml_methods_called_on_nodes_exist(tree, source_lines, release):
    listed = {line.split(".", 1)[1] for line in api_names("mrml_methods.txt", release)}
    modules = imported_modules(tree)
    problems, checked = [], set()
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)):
        method, receiver = call.func.attr, dotted(call.func.value)
        if not re.fullmatch(r"[A-Z][A-Za-z0-9]*", method) or receiver in modules:
            continue  # Python/Qt-style names, or classes taken from a module (qt.QTimer, vtk.vtkMatrix4x4)
        if method in NON_MRML_METHODS or method in UNLISTED_MRML_METHODS:
            continue
        checked.add(method)
        if method not in listed:
            problems.append(f"{where(call, source_lines)}  <- {method} is not an MRML method in mrml_methods.txt "
                            "(if it is called on a non-MRML VTK object, add it to NON_MRML_METHODS)")
    assert not problems, "\n".join(problems)
    assert {"GetIJKToRASMatrix", "SetIJKToRASMatrix", "AddNewNodeByClass", "SetAndObserveColorNodeID"} <= checked
    for method in NON_MRML_METHODS:
        assert method not in listed, f"{method} is an MRML method; drop it from NON_MRML_METHODS"


def test_pytorchutils_calls_exist_with_their_keywords(tree, source_lines):
    signatures = {}
    for line in api_names("pytorchutils_logic.txt"):
        match = re.search(r"PyTorchUtilsLogic\.(\w+)\((.*)\)", line)
        if match:
            signatures[match.group(1)] = {p.split("=")[0].strip().lstrip("*") for p in match.group(2).split(",")}
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and isinstance(n.func.value, ast.Call) and dotted(n.func.value.func) == "PyTorchUtils.PyTorchUtilsLogic"]
    assert calls, "BrainAge.py installs torch through PyTorchUtils.PyTorchUtilsLogic()"
    for call in calls:
        method = call.func.attr
        assert method in signatures, f"{where(call, source_lines)}  <- PyTorchUtilsLogic.{method} is not listed"
        unknown = {k.arg for k in call.keywords} - signatures[method]
        assert not unknown, f"{where(call, source_lines)}  <- {method} takes no keyword(s) {sorted(unknown)}"


def test_widgets_used_exist_in_the_ui_file(tree, source_lines):
    ui_text = UI_FILE.read_text()
    names = set(re.findall(r'<widget class="\w+" name="(\w+)"', ui_text))
    problems = [f"{where(n, source_lines)}  <- no widget named {n.attr!r} in BrainAge/Resources/UI/BrainAge.ui"
                for n in ast.walk(tree) if isinstance(n, ast.Attribute) and dotted(n.value) == "self.ui" and n.attr not in names]
    assert not problems, "\n".join(problems)
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call) and dotted(n.func) == "self.resourcePath"):
        relative = call.args[0].value
        assert (MODULE_DIR / "Resources" / relative).is_file(), f"{where(call, source_lines)}  <- no such resource"


def parameter_node_class(tree: ast.Module) -> ast.ClassDef:
    return next(node for node in tree.body if isinstance(node, ast.ClassDef)
                and any(dotted(d) == "parameterNodeWrapper" for d in node.decorator_list))


def test_parameter_node_uses_only_names_slicer_5_10_has(tree, source_lines):
    """@parameterNodeWrapper and its annotations exist at the oldest supported release; `from slicer import`
    brings MRML classes only; the methods called on the parameter node are the wrapper's members."""
    exported = set(api_names("parameter_node_wrapper.txt", "v5.10.0"))
    mrml_classes = {line.split(".", 1)[0] for line in api_names("mrml_methods.txt", "v5.10.0")}
    problems = []
    for node in (n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)):
        if node.module == "slicer.parameterNodeWrapper":
            problems += [f"{where(node, source_lines)}  <- {a.name} is not in parameter_node_wrapper.txt (5.10)"
                         for a in node.names if a.name not in exported]
        if node.module == "slicer":
            problems += [f"{where(node, source_lines)}  <- slicer.{a.name} is not an MRML class of mrml_methods.txt"
                         for a in node.names if a.name not in mrml_classes]
    members = {name.split(".", 1)[1] for name in exported if name.startswith("parameterNodeWrapper.")}
    assert PARAMETER_NODE_METHODS <= members, sorted(PARAMETER_NODE_METHODS - members)
    called = {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
              and dotted(n.func.value) in ("self._parameterNode", "parameters")}
    assert called - {"lower"} <= PARAMETER_NODE_METHODS, sorted(called - PARAMETER_NODE_METHODS)
    assert {"connectGui", "disconnectGui"} <= called
    assert not problems, "\n".join(problems)
    parameter_node_class(tree)  # there is one


def test_every_parameter_has_its_widget_and_every_tagged_widget_a_parameter(tree):
    """connectGui pairs widgets whose SlicerParameterName is a parameter's name: a typo in either place
    would leave a widget disconnected (or raise in Slicer). modelLocation is synced by hand (a ctkPathLineEdit
    takes paths; the field also takes https URLs)."""
    fields = [node.target.id for node in parameter_node_class(tree).body if isinstance(node, ast.AnnAssign)]
    tagged = re.findall(r'<property name="SlicerParameterName" stdset="0">\s*<string>(\w+)</string>',
                        UI_FILE.read_text(encoding="utf-8"))
    assert len(tagged) == len(set(tagged)), "a parameter is tagged on two widgets"
    assert set(tagged) == set(fields) - {"modelLocation"}, (sorted(set(fields) - set(tagged)), sorted(set(tagged) - set(fields)))
    assert "modelLocationPathLineEdit" in UI_FILE.read_text(encoding="utf-8")
    assert '<widget class="ctkPathLineEdit" name="modelLocationPathLineEdit">' in UI_FILE.read_text(encoding="utf-8")


def test_the_module_appends_its_library_folder_and_reloads_brainagelib(tree):
    text = MODULE.read_text(encoding="utf-8")
    assert "sys.path.append(_libraryParent)" in text and "sys.path.insert" not in text
    widget = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "BrainAgeWidget")
    reload = next(f for f in widget.body if isinstance(f, ast.FunctionDef) and f.name == "onReload")
    calls = [dotted(n.func) for n in ast.walk(reload) if isinstance(n, ast.Call)]
    assert calls.index("forget_library_modules") < calls.index("ScriptedLoadableModuleWidget.onReload")


# --- CMake lists --------------------------------------------------------------------------

def test_brainagelib_scripts_listed_are_exactly_the_python_files():
    listed = cmake_sets(MODULE_CMAKE)["BRAINAGELIB_PYTHON_SCRIPTS"]
    present = sorted(str(p.relative_to(REPO / "BrainAgeLib")) for p in (REPO / "BrainAgeLib").rglob("*.py")
                     if "__pycache__" not in p.parts)
    missing = [name for name in listed if not (REPO / "BrainAgeLib" / name).is_file()]
    assert not missing, "BrainAge/CMakeLists.txt lists BrainAgeLib files that do not exist: " + ", ".join(missing)
    unlisted = sorted(set(present) - set(listed))
    assert not unlisted, (f"{cmake_line(MODULE_CMAKE, 'set(BRAINAGELIB_PYTHON_SCRIPTS')}  <- add these lines so the "
                          "extension installs them (or run python scripts/update_slicer_cmake_lists.py):\n"
                          + "\n".join(f"  {name}" for name in unlisted))
    assert len(listed) == len(set(listed)), "BRAINAGELIB_PYTHON_SCRIPTS names a file twice"


def test_module_scripts_and_resources_exist_and_are_all_listed():
    sets = cmake_sets(MODULE_CMAKE)
    module_name = sets["MODULE_NAME"][0]
    assert module_name == "BrainAge"
    expand = lambda values: [v.replace("${MODULE_NAME}", module_name) for v in values]  # noqa: E731
    assert expand(sets["MODULE_PYTHON_SCRIPTS"]) == ["BrainAge.py"] and MODULE.is_file()

    resources = expand(sets["MODULE_PYTHON_RESOURCES"])
    for name in resources:
        assert (MODULE_DIR / name).is_file(), f"{cmake_line(MODULE_CMAKE, name.split('/')[-1])}  <- BrainAge/{name} does not exist"
    present = sorted(str(p.relative_to(MODULE_DIR)) for p in (MODULE_DIR / "Resources").rglob("*") if p.is_file())
    unlisted = sorted(set(present) - set(resources))
    assert not unlisted, f"{cmake_line(MODULE_CMAKE, 'set(MODULE_PYTHON_RESOURCES')}  <- add: {', '.join(unlisted)}"


def test_shared_resources_exist_and_are_all_listed():
    listed = cmake_sets(MODULE_CMAKE)["BRAINAGE_SHARED_RESOURCES"]
    missing = [name for name in listed if not (REPO / "Resources" / name).is_file()]
    assert not missing, f"{cmake_line(MODULE_CMAKE, 'set(BRAINAGE_SHARED_RESOURCES')}  <- no such file under Resources/: {missing}"
    present = sorted(str(p.relative_to(REPO / "Resources")) for p in (REPO / "Resources").rglob("*")
                     if p.is_file() and p.relative_to(REPO / "Resources").parts[0] not in UNINSTALLED_RESOURCE_FOLDERS)
    unlisted = sorted(set(present) - set(listed))
    assert not unlisted, (f"{cmake_line(MODULE_CMAKE, 'set(BRAINAGE_SHARED_RESOURCES')}  <- add these lines so the "
                          "extension installs them (or run python scripts/update_slicer_cmake_lists.py):\n"
                          + "\n".join(f"  {name}" for name in unlisted))
    assert "ColorTables/BrainAgeAttention.ctbl" in listed


def test_module_cmake_builds_the_scripted_module_with_tests():
    commands = cmake_commands(MODULE_CMAKE)
    build = " ".join(next(args for name, args in commands if name == "slicermacrobuildscriptedmodule"))
    for keyword in ("NAME ${MODULE_NAME}", "SCRIPTS ${MODULE_PYTHON_SCRIPTS}", "RESOURCES ${MODULE_PYTHON_RESOURCES}",
                    "WITH_GENERIC_TESTS"):
        assert keyword in build, f"slicerMacroBuildScriptedModule in BrainAge/CMakeLists.txt lacks {keyword}"
    names = [name for name, _ in commands]
    unittest_at = names.index("slicer_add_python_unittest")
    assert commands[unittest_at][1] == ["SCRIPT", "${MODULE_NAME}.py"]
    assert names[unittest_at - 1] == "if" and commands[unittest_at - 1][1] == ["BUILD_TESTING"]


def test_extension_metadata_is_complete_and_consistent():
    sets = cmake_sets(TOP_CMAKE)
    for name in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                 "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert sets.get(name) and all(sets[name]), f"CMakeLists.txt must set {name}"
    assert sets["EXTENSION_DEPENDS"] == ["PyTorch"]
    text = TOP_CMAKE.read_text()
    for needle in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(BrainAge)",
                   "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert needle in text, f"CMakeLists.txt lacks {needle}"
    # The icon and screenshot URLs point at files of this repository's main branch.
    for url in sets["EXTENSION_ICONURL"] + sets["EXTENSION_SCREENSHOTURLS"]:
        relative = url.split("/main/", 1)[1]
        assert (REPO / relative).is_file(), f"{cmake_line(TOP_CMAKE, url)}  <- {relative} does not exist"

    description = json.loads(EXTENSION_JSON.read_text())
    assert description["category"] in ("Quantification", "Neuro")
    assert description["category"] == sets["EXTENSION_CATEGORY"][0]
    assert description["build_dependencies"] == sets["EXTENSION_DEPENDS"]
    assert description["build_subdirectory"] == "."
    # One repository everywhere: the catalog entry's scm_url and the homepage, icon and screenshot URLs
    # (the CMakeLists.txt block a publisher fills in, see README "Publishing to the Extensions Index").
    repository = description["scm_url"].removesuffix(".git").split("github.com/")[1]
    for url in sets["EXTENSION_HOMEPAGE"] + sets["EXTENSION_ICONURL"] + sets["EXTENSION_SCREENSHOTURLS"]:
        assert f"/{repository}/" in url + "/" or f"/{repository}#" in url, f"{cmake_line(TOP_CMAKE, url)}  <- not {repository}"
    # Contributors as the Index asks, "Name (Organisation)", the same in CMake and in the module.
    contributors = [c.strip() for c in sets["EXTENSION_CONTRIBUTORS"][0].split(",")]
    assert all(re.fullmatch(r"[^()]+ \([^()]+\)", c) for c in contributors), contributors
    module_contributors = ast.literal_eval(re.search(r"^CONTRIBUTORS = (\[.*?\])", MODULE.read_text(encoding="utf-8"),
                                                     re.M).group(1))
    assert module_contributors == contributors

    from PIL import Image

    for icon in (REPO / "Resources" / "Icons" / "BrainAge.png", MODULE_DIR / "Resources" / "Icons" / "BrainAge.png"):
        with Image.open(icon) as image:
            assert image.size == (128, 128) and image.format == "PNG", icon


def test_catalog_entry_follows_the_extensions_index_schema():
    import jsonschema

    schema = json.loads(CATALOG_SCHEMA.read_text(encoding="utf-8"))
    description = json.loads(EXTENSION_JSON.read_text(encoding="utf-8"))
    assert description["$schema"] == schema["$id"], "BrainAge.json's $schema must name the schema it follows"
    jsonschema.Draft7Validator(schema).validate(description)
    for broken in ({**description, "scmurl": description["scm_url"]}, {k: v for k, v in description.items() if k != "scm_url"}):
        with pytest.raises(jsonschema.ValidationError):  # the old item schema's key, or a missing one, is refused
            jsonschema.Draft7Validator(schema).validate(broken)


HARNESS = """
cmake_minimum_required(VERSION 3.16)
project(BrainAgeCMakeHarness NONE)
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer/qt-scripted-modules)
set(BUILD_TESTING ON)
# Stand-ins that record where Slicer's macros would copy each file: SCRIPTS with an absolute path
# keep their path relative to the module's build folder, relative ones (and RESOURCES) their path
# relative to the module's source folder (CTK's ctkMacroCompilePythonScript rules).
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY "WITH_GENERIC_TESTS" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  foreach(file ${MY_SCRIPTS})
    if(IS_ABSOLUTE ${file})
      set(source ${file})
      file(RELATIVE_PATH target ${CMAKE_CURRENT_BINARY_DIR} ${file})
    else()
      set(source ${CMAKE_CURRENT_SOURCE_DIR}/${file})
      set(target ${file})
    endif()
    if(NOT EXISTS ${source})
      message(FATAL_ERROR "missing script ${source}")
    endif()
    file(APPEND ${CMAKE_BINARY_DIR}/installed.txt "${target}\\n")
  endforeach()
  foreach(file ${MY_RESOURCES})
    if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${file})
      message(FATAL_ERROR "missing resource ${file}")
    endif()
    file(APPEND ${CMAKE_BINARY_DIR}/installed.txt "${file}\\n")
  endforeach()
endmacro()
macro(slicer_add_python_unittest)
  file(APPEND ${CMAKE_BINARY_DIR}/unittests.txt "${ARGN}\\n")
endmacro()
add_subdirectory(@MODULE_DIR@ BrainAge)
"""


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_configures_and_places_brainagelib_beside_the_module(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "CMakeLists.txt").write_text(HARNESS.replace("@MODULE_DIR@", MODULE_DIR.as_posix()))
    done = subprocess.run(["cmake", "-S", str(tmp_path / "src"), "-B", str(tmp_path / "build")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr

    installed = set((tmp_path / "build" / "installed.txt").read_text().split())
    lib_files = {f"BrainAgeLib/{name}" for name in cmake_sets(MODULE_CMAKE)["BRAINAGELIB_PYTHON_SCRIPTS"]}
    assert {"BrainAge.py", "Resources/UI/BrainAge.ui", "Resources/Icons/BrainAge.png"} | lib_files <= installed
    assert all(not name.startswith("..") for name in installed)
    shared = tmp_path / "build" / "lib" / "Slicer" / "qt-scripted-modules" / "Resources"
    assert (shared / "ColorTables" / "BrainAgeAttention.ctbl").read_text() == \
        (REPO / "Resources" / "ColorTables" / "BrainAgeAttention.ctbl").read_text()
    assert "SCRIPT;BrainAge.py" in (tmp_path / "build" / "unittests.txt").read_text()


#: Keywords of ``slicer.util.launchConsoleProcess`` at Slicer 5.10, the oldest supported release
#: (``blocking``, ``logCallback`` and ``completedCallback`` came with 5.12; see slicer-api/v5.10.0/README.md).
LAUNCH_CONSOLE_PROCESS_KEYWORDS_5_10 = {"useStartupEnvironment", "updateEnvironment", "cwd"}


def test_the_worker_is_launched_as_slicer_5_10_can(tree, source_lines):
    """The background estimate and batch start the worker with launchConsoleProcess (listed at 5.10 too),
    with no keyword 5.10 lacks, and read its output through BrainAgeLib.worker_protocol."""
    oldest = set((SHARED_API / "v5.10.0" / "slicer_util_functions.txt").read_text().split()) \
        if (SHARED_API / "v5.10.0").is_dir() else {"launchConsoleProcess"}
    assert "launchConsoleProcess" in oldest
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and dotted(n.func) == "slicer.util.launchConsoleProcess"]
    assert calls, "BrainAge.py starts its worker with slicer.util.launchConsoleProcess"
    for call in calls:
        unknown = {k.arg for k in call.keywords} - LAUNCH_CONSOLE_PROCESS_KEYWORDS_5_10
        assert not unknown, f"{where(call, source_lines)}  <- keyword(s) {sorted(unknown)} do not exist in Slicer 5.10"
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and dotted(n.value) == "slicer.util"}
    assert oldest >= used or not (SHARED_API / "v5.10.0").is_dir(), \
        f"slicer.util names missing at Slicer 5.10: {sorted(used - oldest)}"
    text = MODULE.read_text(encoding="utf-8")
    assert "worker_command(" in text and "batch_command(" in text and "WorkerMonitor(" in text
    assert "concurrent.futures" not in text and "threading" not in text, "the estimate runs in a process, not a thread"


#: MRML calls that exist but BrainAge.py must not make, and why (issue 15 item 4).
AVOIDED_MRML_CALLS = {
    "SetNamesInitialised": "SetColor(index, name, r, g, b, a) names each colour; the flag is the node's own business",
    "GetFirstNodeByName": "finds a node of any class with that name: use GetFirstNode(name, className)",
}


def test_avoided_mrml_calls_are_not_made(tree, source_lines):
    problems = [f"{where(call, source_lines)}  <- {call.func.attr}: {AVOIDED_MRML_CALLS[call.func.attr]}"
                for call in ast.walk(tree) if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                and call.func.attr in AVOIDED_MRML_CALLS]
    assert not problems, "\n".join(problems)
    color_lookups = [call for call in ast.walk(tree) if isinstance(call, ast.Call) and dotted(call.func) ==
                     "slicer.mrmlScene.GetFirstNode"]
    assert color_lookups and all(len(c.args) == 2 and getattr(c.args[1], "value", None) == "vtkMRMLColorTableNode"
                                 for c in color_lookups), "the colour table is found by name and class"
