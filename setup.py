"""Build the Cython extensions: the tokenizer ``router._fastparse``, the stanza router ``router._fastroute``, and
the load tools' per-stanza work ``bench.loadlib._fastload`` (built in place, not installed)."""
from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "router._fastparse",
        ["router/_fastparse.pyx"],
        extra_compile_args=["-O3"],
    ),
    Extension(
        "router._fastroute",
        ["router/_fastroute.pyx"],
        extra_compile_args=["-O3"],
    ),
    Extension(
        "bench.loadlib._fastload",
        ["bench/loadlib/_fastload.pyx"],
        extra_compile_args=["-O3"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    ),
)
