"""When ``import fusion`` cannot load its native module, the ImportError says
what happened and how to rebuild, and is not a bare loader traceback.

Each case copies the Python package to a temporary directory, puts a broken
``_C`` next to it (or none), and imports it in a fresh interpreter.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest
import torch

import fusion

SLOW = pytest.mark.slow  # each case below starts an interpreter that imports torch

PACKAGE = os.path.dirname(fusion.__file__)
SUFFIX = sysconfig.get_config_var("EXT_SUFFIX")
RUNNING = torch.__version__.split("+")[0]

# The editable install's finder (``pip install -e``) would find fusion._C in
# the source tree when the copy has none; the probe imports as an ordinary
# install does, from sys.path alone.
PROBE = textwrap.dedent("""
    import sys
    sys.meta_path[:] = [f for f in sys.meta_path
                        if "__editable__" not in getattr(f, "__module__", "")]
    try:
        import fusion
    except ImportError as exc:
        print("FILE", getattr(sys.modules.get("fusion._native"), "__file__", None))
        print("CAUSE", exc.__cause__ is None, exc.__suppress_context__)
        raise
    print("FILE", fusion.__file__)
    print("LOADED", fusion._C.torch_version)
""")


def package_copy(tmp_path, native=None):
    """The package's Python files in ``tmp_path/fusion``; ``native(dir)``
    puts a ``_C`` there."""
    dest = tmp_path / "fusion"
    dest.mkdir()
    for name in os.listdir(PACKAGE):
        if name.endswith(".py"):
            shutil.copy(os.path.join(PACKAGE, name), dest / name)
    if native is not None:
        native(dest)
    return tmp_path


def import_in(root):
    env = dict(os.environ, PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-c", PROBE], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def compile_extension(dest, body):
    """Builds ``dest/_C`` from C source ``body`` that defines the module."""
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc")
    include = sysconfig.get_paths()["include"]
    if not os.path.exists(os.path.join(include, "Python.h")):
        pytest.skip("needs Python.h (python3-dev)")
    src = dest / "_C_src.c"
    src.write_text("#define PY_SSIZE_T_CLEAN\n#include <Python.h>\n" + body)
    subprocess.run(["gcc", "-shared", "-fPIC", f"-I{include}", str(src), "-o",
                    str(dest / f"_C{SUFFIX}")], check=True, capture_output=True)
    src.unlink()


def assert_explained(result, *phrases):
    """The import failed with fusion's own ImportError, and only that."""
    assert result.returncode != 0, result.stdout
    err = result.stderr.strip()
    last = err.splitlines()[-1]
    assert last.startswith("ImportError: fusion's native module"), err
    assert "Rebuild it against the installed torch" in last
    assert "make setup" in last and "--no-build-isolation" in last
    # one traceback, not the loader's followed by ours
    assert err.count("Traceback (most recent call last)") == 1, err
    assert "During handling of the above exception" not in err
    assert "The above exception was the direct cause" not in err
    for phrase in phrases:
        assert phrase in last, last
    return last


def test_the_loaded_module_was_built_for_the_running_torch():
    """Not marked slow: runs in every suite. The extension this interpreter loaded
    was compiled against the torch that is running (its recorded version and the
    marker in its file agree), and is not one left in the source tree."""
    from fusion import _native

    assert fusion._C.torch_version == RUNNING
    assert _native._built_for() == RUNNING
    tree = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fusion")
    assert os.path.dirname(os.path.realpath(fusion._C.__file__)) != os.path.realpath(tree)


@SLOW
def test_a_good_copy_imports(tmp_path):
    """The control: the same copy with the real module imports, from the copy."""
    def real(dest):
        shutil.copy(fusion._C.__file__, dest / os.path.basename(fusion._C.__file__))

    result = import_in(package_copy(tmp_path, real))
    assert result.returncode == 0, result.stderr
    assert f"FILE {tmp_path}" in result.stdout
    assert f"LOADED {RUNNING}" in result.stdout


@SLOW
def test_missing_native_module(tmp_path):
    last = assert_explained(import_in(package_copy(tmp_path)), "could not be loaded",
                            "or was never built", f"torch {torch.__version__}")
    assert "cannot import name '_C'" in last


@SLOW
def test_empty_native_module(tmp_path):
    def empty(dest):
        (dest / f"_C{SUFFIX}").write_bytes(b"")

    assert_explained(import_in(package_copy(tmp_path, empty)), "could not be loaded")


# A module cut off inside a segment that the loader maps (4 KiB of it, say) is
# not tested: glibc's dlopen dies of SIGBUS on it before Python can raise.
@SLOW
@pytest.mark.parametrize("content", [b"\x7fELF" + bytes(60), b"not a shared object\n" * 50],
                         ids=["elf-header-only", "garbage"])
def test_corrupted_native_module(tmp_path, content):
    def corrupted(dest):
        (dest / f"_C{SUFFIX}").write_bytes(content)

    assert_explained(import_in(package_copy(tmp_path, corrupted)), "could not be loaded")


@SLOW
def test_native_module_with_an_undefined_symbol(tmp_path):
    """What a module built against another libtorch looks like to the loader."""
    def unresolved(dest):
        compile_extension(dest, textwrap.dedent("""
            extern int fusion_symbol_from_another_torch(void);
            static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", NULL, -1, NULL};
            PyMODINIT_FUNC PyInit__C(void) {
                if (fusion_symbol_from_another_torch()) { return NULL; }
                return PyModule_Create(&def);
            }
        """))

    last = assert_explained(import_in(package_copy(tmp_path, unresolved)),
                            "could not be loaded", "built against another torch")
    # what the loader said is kept, as the reason, inside our message
    assert "undefined symbol: fusion_symbol_from_another_torch" in last


@SLOW
@pytest.mark.parametrize("kind", ["extension", "python"])
def test_native_module_built_for_another_torch_version(tmp_path, kind):
    def other(dest):
        if kind == "extension":
            compile_extension(dest, textwrap.dedent("""
                static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", NULL, -1, NULL};
                PyMODINIT_FUNC PyInit__C(void) {
                    PyObject *m = PyModule_Create(&def);
                    if (m != NULL && PyModule_AddStringConstant(m, "torch_version",
                                                                "0.9.1") < 0) {
                        Py_DECREF(m);
                        return NULL;
                    }
                    return m;
                }
            """))
        else:
            (dest / "_C.py").write_text('torch_version = "0.9.1"\n')

    assert_explained(import_in(package_copy(tmp_path, other)),
                     "was built against torch 0.9.1", f"but torch {RUNNING} is installed")


@SLOW
def test_same_version_string_passes_the_check(tmp_path):
    """The control for the version check: the string alone decides."""
    def same(dest):
        (dest / "_C.py").write_text(f'torch_version = "{RUNNING}"\n')

    result = import_in(package_copy(tmp_path, same))
    assert result.returncode == 0, result.stderr
    assert f"LOADED {RUNNING}" in result.stdout


# --- across the two torches ------------------------------------------------------------
# The Makefile builds each venv's fusion._C in build/py<ver>-torch<torch version>/
# (setup.py). Both venvs are CPython 3.11, so both builds have the same file name:
# the other torch's build, dropped into this torch's package, must give the rebuild
# ImportError. CI installs the oldest venv before running either suite, so each
# suite finds the other's build (tests/suite_parity.py requires this test to run
# on both).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def other_torch_builds():
    """{torch version: path} of fusion._C builds in build/ for another torch."""
    found = {}
    root = os.path.join(REPO, "build")
    tag = "py%d%d-torch" % sys.version_info[:2]
    for entry in sorted(os.listdir(root)) if os.path.isdir(root) else ():
        version = entry[len(tag):] if entry.startswith(tag) else None
        if version is None or version == torch.__version__:
            continue
        for dirpath, _, files in os.walk(os.path.join(root, entry)):
            for name in files:
                if name == f"_C{SUFFIX}" and os.path.basename(dirpath) == "fusion":
                    found[version] = os.path.join(dirpath, name)
    return found


@SLOW
def test_a_build_for_the_other_torch_gives_the_rebuild_error(tmp_path):
    builds = other_torch_builds()
    if not builds:
        pytest.skip("no build for another torch in build/: run `make install-oldest` "
                    "and `make install` (CI does both first)")
    for version, path in builds.items():
        root = tmp_path / version
        root.mkdir()
        result = import_in(package_copy(root, lambda dest: shutil.copy(path, dest)))
        last = assert_explained(result)
        built = version.split("+")[0]
        # Either the loader refuses it (another libtorch's symbols), or it loads
        # and its recorded torch version differs from the running one.
        assert ("could not be loaded" in last or
                f"built against torch {built}, but torch {RUNNING}" in last), last
