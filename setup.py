"""nuclei-d2: nuclei instance segmentation in H&E histopathology on Detectron2."""

from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = {}
exec((here / "nuclei_d2" / "version.py").read_text(), version)

setup(
    name="nuclei-d2",
    version=version["__version__"],
    description="Published nuclei instance-segmentation methods for H&E histopathology as Detectron2 components",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    # The code is Apache-2.0 like Detectron2 (LICENSE). Data sets and weights trained on them carry their own terms:
    # README.md, "Licences". SPDX expression (PEP 639) rather than the deprecated "License ::" classifier.
    license_expression="Apache-2.0",
    license_files=["LICENSE"],
    classifiers=[
        "Development Status :: 4 - Beta",
        "Intended Audience :: Science/Research",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Topic :: Scientific/Engineering :: Image Recognition",
        "Topic :: Scientific/Engineering :: Medical Science Apps.",
    ],
    python_requires=">=3.10",
    packages=find_packages(include=["nuclei_d2", "nuclei_d2.*"]),
    # the model zoo: its manifest, entry configs and weights (docs/model_zoo.md)
    package_data={"nuclei_d2": ["model_zoo/manifest.yaml", "model_zoo/configs/*.yaml", "model_zoo/weights/*.pth"]},
    # torch, torchvision and detectron2 are installed by scripts/setup_env.sh (no Python 3.11 wheel of Detectron2
    # exists on PyPI); everything else is in requirements.txt.
    install_requires=[
        "numpy>=1.24,<2",
        "opencv-python-headless>=4.8,<4.12",
        "pycocotools>=2.0.7",
        "scipy",
        "scikit-image>=0.21",
        "tifffile",
        "tqdm",
    ],
    # Whole-slide formats beyond TIFF/SVS (NDPI, MRXS, ...): `pip install nuclei-d2[slides]`, then --backend
    # tiffslide / openslide (docs/inference.md).
    extras_require={"slides": ["tiffslide", "openslide-python", "openslide-bin"]},
)
