"""Package metadata. Requirement ranges live in fastsd/features.py, shared with the installer.

torch is deliberately not a requirement (see features.py): fastsd uses the runtime's own build.
"""

from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
#: The repository: the one place its URL is written. notebooks/build.py reads it from here for the
#: notebooks' install line and Colab badges, and for the README's badges and install line.
REPOSITORY = "https://github.com/fastsd/fastsd"
table: dict = {}
exec((here / "fastsd" / "features.py").read_text(), table)  # stdlib-only data module

extras = {name: table["requirements_for"]([name]) for name in table["FEATURES"]}
extras["all"] = sorted({r for reqs in extras.values() for r in reqs})
extras["test"] = sorted(set(extras["all"]) | set(table["TEST"]))

setup(
    name="fastsd",
    version="0.1.0",
    description="DreamBooth training, model conversion, web UIs and OCR on Colab-class GPUs",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    url=REPOSITORY,
    project_urls={"Source": REPOSITORY, "Notebooks": f"{REPOSITORY}/tree/main/notebooks"},
    python_requires=">=3.10,<3.14",
    packages=find_packages(include=["fastsd", "fastsd.*"]) + ["fastsd._wheels"],
    package_dir={"fastsd._wheels": "wheels"},
    package_data={"fastsd._wheels": ["*.txt"], "fastsd": ["**/*.json", "**/*.yaml", "**/*.gz"]},
    install_requires=list(table["CORE"]),
    extras_require=extras,
    entry_points={"console_scripts": ["fastsd=fastsd.cli:entry"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
    ],
)
