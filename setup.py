"""Build the Cython extensions: the tokenizer ``router._fastparse`` and the stanza router ``router._fastroute``."""
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
