"""Build the Cython tokenizer extension ``router._fastparse``."""
from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "router._fastparse",
        ["router/_fastparse.pyx"],
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
