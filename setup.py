"""Builds fusion's native extension, fusion._C. Metadata lives in pyproject.toml.

The extension mixes C11 (csrc/fold.c, csrc/module.c) with one C++ translation
unit (csrc/torch_shim.cpp), so each source is compiled with its own language
flags: torch's BuildExtension would compile the C files as C++.

Switches, read from the environment:
  FUSION_DEBUG=1     -O0 -g, assertions kept
  FUSION_SANITIZE=1  AddressSanitizer and UndefinedBehaviorSanitizer
  FUSION_OPENMP=0    build the core without OpenMP
"""
import os
import types

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _flag(name):
    return os.environ.get(name, "").strip() not in ("", "0")


def _torch_config():
    """What the build needs from the torch it builds against."""
    import torch
    from torch.utils import cpp_extension

    return types.SimpleNamespace(
        include_dirs=cpp_extension.include_paths(),
        library_dirs=cpp_extension.library_paths(),
        abi=int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 1)),
        version=torch.__version__.split("+")[0])


def _cxx_standard(version):
    """The C++ standard torch's headers need: C++20 from 2.12 on (ATen refuses
    older ones there), C++17 before (torch 2.1 needs it, and gcc takes it for
    1.13 too)."""
    major, minor = (int(p) for p in version.split(".")[:2])
    return "-std=c++20" if (major, minor) >= (2, 12) else "-std=c++17"


class BuildExt(build_ext):
    """build_ext that gives .c files C11 flags and .cpp files the C++ flags torch needs."""

    def build_extensions(self):
        debug = _flag("FUSION_DEBUG")
        sanitize = _flag("FUSION_SANITIZE")
        openmp = os.environ.get("FUSION_OPENMP", "1") != "0"
        common = ["-O0", "-g"] if debug else ["-O3"]
        common += ["-Wall", "-Wextra", "-fvisibility=hidden"]
        link = []
        if sanitize:
            san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                   "-fno-sanitize-recover=undefined"]
            common += san
            link += san
        c_flags = ["-std=c11", "-Wno-missing-field-initializers"] + common
        if openmp:
            c_flags.append("-fopenmp")
            link.append("-fopenmp")
        cxx_flags = [_cxx_standard(_torch_config().version), "-Wno-unused-parameter",
                     "-Wno-deprecated-declarations"] + common
        original = self.compiler._compile

        def _compile(obj, src, ext, cc_args, extra_postargs, pp_opts):
            flags = c_flags if src.endswith(".c") else cxx_flags
            original(obj, src, ext, cc_args, list(extra_postargs) + flags, pp_opts)

        self.compiler._compile = _compile
        for extension in self.extensions:
            extension.extra_link_args = list(extension.extra_link_args or []) + link
        super().build_extensions()


def _extension():
    torch_config = _torch_config()
    include_dirs = [d for d in torch_config.include_dirs if os.path.isdir(d)]
    library_dirs = torch_config.library_dirs
    return Extension(
        "fusion._C",
        sources=["csrc/fold.c", "csrc/module.c", "csrc/torch_shim.cpp"],
        include_dirs=["csrc"] + include_dirs,
        # No rpath to torch's libraries: `import torch` (fusion/_native.py) has
        # loaded them, and the loader resolves these by soname to the running
        # torch's. With an rpath, a build for another torch would load a second
        # libtorch into the process, whose initialisers abort it.
        library_dirs=library_dirs,
        libraries=["c10", "torch_cpu", "torch", "torch_python", "m"],
        define_macros=[
            ("_GLIBCXX_USE_CXX11_ABI", str(torch_config.abi)),
            ("FUSION_TORCH_VERSION", '"%s"' % torch_config.version),
        ],
        depends=["csrc/fold.h", "csrc/torch_shim.h", "setup.py"],
        language="c++",
    )


def _build_base():
    """One build directory per interpreter and torch: two venvs of the same
    Python build extensions with the same file name, and neither may pick up
    objects compiled against the other's torch."""
    import sys

    import torch

    return os.path.join("build", "py%d%d-torch%s" % (sys.version_info[:2] + (torch.__version__,)))


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExt},
      options={"build": {"build_base": _build_base()}})
