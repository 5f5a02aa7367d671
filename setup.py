from setuptools import find_packages, setup

setup(
    name="kvkernels",
    version="0.1.0",
    description="Triton/CuPy kernels for KV-cache compression (KVzip, KIVI, GEAR) as torch.library ops",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",  # tested with 3.11.7 and torch 2.13.0 (CPU build); see the README's support matrix
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Operating System :: POSIX :: Linux",
    ],
    packages=find_packages(include=["kvkernels", "kvkernels.*"]) + ["kvkernels.reference", "autotune"],
    # The references live in the top-level reference/ folder but install under the kvkernels namespace.
    package_dir={"kvkernels.reference": "reference"},
    package_data={"kvkernels": ["configs/*.json", "cpu/csrc/*.cpp", "cpu/csrc/*.h"]},
    install_requires=["torch>=2.6"],
    extras_require={
        "triton": ["triton>=3.2"],
        # nvidia-cuda-nvrtc-cu12: the static check compiles the CuPy top-k source for sm_80/sm_90 with NVRTC
        # (no GPU or driver needed); its test skips without it.
        "test": ["pytest>=8", "hypothesis>=6", "pytest-benchmark>=4", "triton>=3.2", "tqdm", "matplotlib>=3.7",
                 "nvidia-cuda-nvrtc-cu12; platform_system == 'Linux'"],
        "cupy": ["cupy-cuda12x>=13"],
        "hf": ["transformers>=5.23,<5.24", "gguf>=0.10", "accelerate>=1.0", "tqdm"],
        "bench": ["pytest-benchmark>=4", "matplotlib>=3.7", "nvtx", "tqdm"],
    },
    entry_points={"console_scripts": ["kvkernels=kvkernels.cli:main", "kvkernels-autotune=autotune.__main__:main"]},
)
