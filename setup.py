"""fused_resnet: pip install -e . (add --no-build-isolation to compile the CUDA extension against the torch
installed in the environment; see README "Building the CUDA extension")."""
import importlib.util
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _build_settings():
    spec = importlib.util.spec_from_file_location("_fr_build", os.path.join(ROOT, "fused_resnet", "backends", "build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cuda_extension():
    """([CUDAExtension], {"build_ext": BuildExtension}) where the extension can be built, else ([], {})."""
    build = _build_settings()
    if build.skip_requested():
        print("fused_resnet: FUSED_RESNET_SKIP_CUDA_BUILD=1, not building the CUDA extension")
        return [], {}
    reason = build.unavailable_reason()
    if reason is not None:
        print(f"fused_resnet: not building the CUDA extension: {reason}")
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    build.set_build_env()
    ext = CUDAExtension(
        name="fused_resnet._C",
        sources=build.SOURCES,
        include_dirs=build.include_dirs(),
        extra_compile_args={"cxx": build.cxx_flags(), "nvcc": build.nvcc_flags()},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension()

setup(
    name="fused_resnet",
    version="0.1.0",
    description="Fused conv-BatchNorm-ReLU(+residual) ResNet blocks for PyTorch, with Triton and CUDA kernels",
    packages=["fused_resnet", "fused_resnet.backends", "fused_resnet.backends.cuda", "fused_resnet.testing",
              "fused_resnet.tools", "fused_resnet.kernels"],
    package_dir={"fused_resnet": "fused_resnet", "fused_resnet.kernels": "kernels"},
    # Supported and tested (README "Supported versions"): Python 3.10-3.12, torch 2.11-2.14, Triton 3.6-3.8. Only
    # the lower bounds are requirements: an upper cap would make pip downgrade torch (gigabytes, and a rebuild of
    # the extension) or refuse a newer Python where the package may well work; the classifiers name what is tested.
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "torchvision>=0.26"],
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: C++",
        "Environment :: GPU :: NVIDIA CUDA",
        "Operating System :: POSIX :: Linux",
        "Intended Audience :: Science/Research",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    extras_require={
        "triton": ["triton>=3.6"],
        "train": ["mnist1d", "matplotlib", "tqdm"],  # fused-resnet train / experiment (imported only there)
        "test": ["pytest", "pytest-benchmark", "mnist1d", "matplotlib", "tqdm", "timm"],  # timm: its ResNets convert
        "build": ["ninja", "pybind11"],
    },
    entry_points={"console_scripts": ["fused-resnet=fused_resnet.tools.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
