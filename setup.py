"""setup.py only drives CMake; CMakeLists.txt is the one description of the native build."""
from setuptools import setup

setup(
    packages=["devit_ext", "devit_ext.ops", "devit_ext.engines", "devit_ext.bench", "devit_ext.kernels"],
    package_dir={"devit_ext": "devit_ext", "devit_ext.kernels": "kernels"},
)
